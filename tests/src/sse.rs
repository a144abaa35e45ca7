//! A Server-Sent Events reader for the stream's tests: frames as the
//! specification splits them (blank-line separated; `field: value` lines;
//! `:` comments).

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};

/// One dispatched event.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
    /// When its last byte arrived.
    pub at: Instant,
}

impl Event {
    /// `data` as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }

    /// The `as_of` part of the id (`<as_of_ms>-<version>`).
    pub fn as_of_ms(&self) -> Option<u64> {
        self.id.as_deref()?.split_once('-')?.0.parse().ok()
    }
}

/// What the reader saw next.
#[derive(Debug)]
pub enum Next {
    Event(Event),
    /// The server closed the stream.
    End,
    /// Nothing within the time given.
    Timeout,
}

pub struct EventStream {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<actix_web::web::Bytes>> + Send>>,
    buf: Vec<u8>,
    /// `:` comment lines seen (heartbeats).
    pub comments: usize,
    /// `retry:` values seen.
    pub retry: Option<u64>,
}

impl EventStream {
    pub fn new(response: reqwest::Response) -> Self {
        Self { body: Box::pin(response.bytes_stream()), buf: Vec::new(), comments: 0, retry: None }
    }

    /// The next event (comments and `retry:` frames are recorded and
    /// skipped).
    pub async fn next(&mut self, within: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = find_blank_line(&self.buf) {
                let frame: Vec<u8> = self.buf.drain(..end.1).collect();
                if let Some(event) = self.parse(&frame[..end.0]) {
                    return Next::Event(event);
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Err(_) => return Next::Timeout,
                Ok(None) => return Next::End,
                Ok(Some(Err(e))) => panic!("stream read failed: {e}"),
                // CRLF and CR end lines as LF does.
                Ok(Some(Ok(chunk))) => {
                    let text = String::from_utf8_lossy(&chunk).replace("\r\n", "\n").replace('\r', "\n");
                    self.buf.extend_from_slice(text.as_bytes());
                }
            }
        }
    }

    /// The next event, which must come within `within`.
    pub async fn expect(&mut self, within: Duration) -> Event {
        match self.next(within).await {
            Next::Event(e) => e,
            other => panic!("expected an event within {within:?}, got {other:?}"),
        }
    }

    fn parse(&mut self, frame: &[u8]) -> Option<Event> {
        let text = std::str::from_utf8(frame).expect("frames are UTF-8");
        let (mut id, mut event, mut data, mut any) = (None, "message".to_string(), Vec::new(), false);
        for line in text.split('\n') {
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) =
                line.split_once(':').map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
            match field {
                "id" => id = Some(value.to_string()),
                "event" => event = value.to_string(),
                "data" => {
                    data.push(value.to_string());
                    any = true;
                }
                "retry" => self.retry = value.parse().ok(),
                _ => {}
            }
        }
        any.then(|| Event { id, event, data: data.join("\n"), at: Instant::now() })
    }
}

/// The end of the first frame: (where its text ends, where the next begins).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2))
}
