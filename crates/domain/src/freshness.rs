//! How fresh an answer is, and how fresh a client wants it: the
//! `min_as_of` and `max_staleness_ms` parameters, and the watermark an
//! answer is compared with.
//!
//! An answer's `as_of` (milliseconds since the epoch, UTC) means: every
//! change committed in MongoDB *before* that millisecond is reflected. A
//! client asking `min_as_of = T` wants every change committed at or before
//! millisecond `T`, which an `as_of` of `T + 1` or later gives.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::params::{ParamError, ParamValue};

/// A MongoDB cluster time (a BSON timestamp: seconds, then an increment
/// that orders the operations of one second), as a driver returns it in
/// `operationTime`. Ordered as MongoDB orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterTime {
    pub seconds: u32,
    pub increment: u32,
}

impl ClusterTime {
    /// The cluster time just before this one: everything at or before it
    /// precedes `self`.
    pub fn pred(self) -> Self {
        match self.increment {
            0 => Self { seconds: self.seconds.saturating_sub(1), increment: u32::MAX },
            i => Self { seconds: self.seconds, increment: i - 1 },
        }
    }
}

impl fmt::Display for ClusterTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.seconds, self.increment)
    }
}

/// The latest `min_as_of` accepted (9999-12-31T23:59:59.999Z), so that
/// every accepted value has an RFC 3339 form.
const MAX_MS: u64 = 253_402_300_799_999;

/// What a client's write must be reflected by: an instant, or the cluster
/// time MongoDB returned for the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinAsOf {
    /// Milliseconds since the epoch: every change committed at or before
    /// this millisecond.
    Millis(u64),
    /// Every change at or before this cluster time.
    ClusterTime(ClusterTime),
}

/// How fresh a client wants its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Freshness {
    pub min_as_of: Option<MinAsOf>,
    /// Older than this, the cache's answer is not served.
    pub max_staleness_ms: Option<u64>,
}

impl Freshness {
    /// The parameters this reads.
    pub fn is_parameter(name: &str) -> bool {
        matches!(name, "min_as_of" | "max_staleness_ms")
    }

    /// Reads `min_as_of` and `max_staleness_ms` from the request's
    /// parameters (others are ignored; one given twice is an error).
    pub fn from_params<'a, I>(params: I) -> Result<Self, ParamError>
    where
        I: IntoIterator<Item = &'a (String, ParamValue)>,
    {
        let mut freshness = Self::default();
        let mut seen = [false; 2];
        for (name, value) in params {
            let slot = match name.as_str() {
                "min_as_of" => 0,
                "max_staleness_ms" => 1,
                _ => continue,
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(ParamError::new(name, format!("{name} is given more than once")));
            }
            if slot == 0 {
                freshness.min_as_of = Some(parse_min_as_of(value)?);
            } else {
                freshness.max_staleness_ms = Some(parse_staleness(value)?);
            }
        }
        Ok(freshness)
    }
}

fn parse_min_as_of(value: &ParamValue) -> Result<MinAsOf, ParamError> {
    let invalid = || {
        ParamError::new(
            "min_as_of",
            format!(
                "min_as_of must be epoch milliseconds, an RFC 3339 time (2026-12-01T10:00:00.123Z) or a MongoDB \
                 operationTime as \"<seconds>.<increment>\", got {value}"
            ),
        )
    };
    let millis = |n: u64| if n <= MAX_MS { Ok(MinAsOf::Millis(n)) } else { Err(invalid()) };
    match value {
        ParamValue::Int(n) => u64::try_from(*n).map_err(|_| invalid()).and_then(millis),
        ParamValue::Text(s) if is_digits(s) => s.parse::<u64>().map_err(|_| invalid()).and_then(millis),
        ParamValue::Text(s) => match s.split_once('.') {
            Some((seconds, increment)) if is_digits(seconds) && is_digits(increment) => {
                match (seconds.parse::<u32>(), increment.parse::<u32>()) {
                    (Ok(seconds), Ok(increment)) => Ok(MinAsOf::ClusterTime(ClusterTime { seconds, increment })),
                    _ => Err(invalid()),
                }
            }
            _ => DateTime::parse_from_rfc3339(s)
                .ok()
                .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
                .ok_or_else(invalid)
                .and_then(millis),
        },
        _ => Err(invalid()),
    }
}

fn parse_staleness(value: &ParamValue) -> Result<u64, ParamError> {
    let invalid = || {
        ParamError::new(
            "max_staleness_ms",
            format!("max_staleness_ms must be a whole number of milliseconds, at least 0, got {value}"),
        )
    };
    match value {
        ParamValue::Int(n) => u64::try_from(*n).map_err(|_| invalid()),
        ParamValue::Text(s) if is_digits(s) => s.parse::<u64>().map_err(|_| invalid()),
        _ => Err(invalid()),
    }
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// How far the read model has come, per projector partition: every change
/// committed before `at_ms` is applied, and, when known, every change at
/// or before cluster time `through`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Watermark {
    pub at_ms: u64,
    pub through: Option<ClusterTime>,
}

impl Watermark {
    /// Whether an answer this fresh reflects everything `min` asks for.
    pub fn covers(&self, min: MinAsOf) -> bool {
        match min {
            MinAsOf::Millis(t) => self.at_ms > t,
            MinAsOf::ClusterTime(c) => self.through.is_some_and(|through| through >= c),
        }
    }

    /// The later of the two on each part.
    pub fn max(self, other: Self) -> Self {
        Self { at_ms: self.at_ms.max(other.at_ms), through: self.through.max(other.through) }
    }

    /// The earlier of the two on each part: what an answer built from
    /// both partitions' data can claim.
    pub fn min(self, other: Self) -> Self {
        Self { at_ms: self.at_ms.min(other.at_ms), through: self.through.min(other.through) }
    }
}

/// `ms` as RFC 3339, UTC, with milliseconds: `2026-12-01T10:00:00.123Z`.
pub fn rfc3339_ms(ms: u64) -> String {
    DateTime::<Utc>::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(pairs: &[(&str, ParamValue)]) -> Result<Freshness, ParamError> {
        let pairs: Vec<(String, ParamValue)> = pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        Freshness::from_params(&pairs)
    }

    fn text(s: &str) -> ParamValue {
        ParamValue::Text(s.to_string())
    }

    fn min_of(v: ParamValue) -> Result<MinAsOf, ParamError> {
        parse(&[("min_as_of", v)]).map(|f| f.min_as_of.expect("given"))
    }

    #[test]
    fn min_as_of_in_every_form() {
        assert_eq!(min_of(ParamValue::Int(1_764_583_200_123)), Ok(MinAsOf::Millis(1_764_583_200_123)));
        assert_eq!(min_of(text("1764583200123")), Ok(MinAsOf::Millis(1_764_583_200_123)));
        assert_eq!(min_of(text("2025-12-01T10:00:00.123Z")), Ok(MinAsOf::Millis(1_764_583_200_123)));
        assert_eq!(min_of(text("2025-12-01T11:00:00.123+01:00")), Ok(MinAsOf::Millis(1_764_583_200_123)));
        assert_eq!(
            min_of(text("1764583200.7")),
            Ok(MinAsOf::ClusterTime(ClusterTime { seconds: 1_764_583_200, increment: 7 }))
        );
        assert_eq!(min_of(ParamValue::Int(0)), Ok(MinAsOf::Millis(0)));
    }

    #[test]
    fn bad_values_name_the_parameter() {
        for bad in [
            text(""),
            text("-5"),
            text("+5"),
            text(" 5"),
            text("1.2.3"),
            text(".5"),
            text("5."),
            text("99999999999.1"),
            text("1.99999999999"),
            text("yesterday"),
            text("2025-13-01T10:00:00Z"),
            text("1960-01-01T00:00:00Z"),
            text("99999999999999999999"),
            text("253402300800000"),
            ParamValue::Int(-1),
            ParamValue::Float(1.5),
            ParamValue::Bool(true),
            ParamValue::Other("null"),
        ] {
            let err = min_of(bad.clone()).unwrap_err();
            assert_eq!(err.param, "min_as_of", "{bad:?}");
            assert!(err.message.contains("operationTime"), "{}", err.message);
        }
        for bad in [text("-1"), text("1.5"), text("1e3"), ParamValue::Int(-1), ParamValue::Float(2.0), text("")] {
            let err = parse(&[("max_staleness_ms", bad.clone())]).unwrap_err();
            assert_eq!(err.param, "max_staleness_ms", "{bad:?}");
        }
        assert_eq!(parse(&[("max_staleness_ms", text("0"))]).unwrap().max_staleness_ms, Some(0));
        let twice = parse(&[("min_as_of", text("1")), ("min_as_of", text("2"))]).unwrap_err();
        assert_eq!(twice.message, "min_as_of is given more than once");
        assert_eq!(parse(&[("limit", text("x"))]).unwrap(), Freshness::default());
    }

    #[test]
    fn covering_is_strictly_after_the_millisecond_asked_for() {
        let w = Watermark { at_ms: 1000, through: Some(ClusterTime { seconds: 5, increment: 2 }) };
        assert!(w.covers(MinAsOf::Millis(999)));
        assert!(!w.covers(MinAsOf::Millis(1000)));
        assert!(w.covers(MinAsOf::ClusterTime(ClusterTime { seconds: 5, increment: 2 })));
        assert!(!w.covers(MinAsOf::ClusterTime(ClusterTime { seconds: 5, increment: 3 })));
        assert!(!Watermark { at_ms: 1000, through: None }
            .covers(MinAsOf::ClusterTime(ClusterTime { seconds: 0, increment: 0 })));
        assert_eq!(ClusterTime { seconds: 5, increment: 0 }.pred(), ClusterTime { seconds: 4, increment: u32::MAX });
        assert_eq!(rfc3339_ms(1_764_583_200_123), "2025-12-01T10:00:00.123Z");
    }

    proptest! {
        #[test]
        fn rfc3339_round_trips(ms in 0u64..=MAX_MS) {
            prop_assert_eq!(min_of(text(&rfc3339_ms(ms))), Ok(MinAsOf::Millis(ms)));
            prop_assert_eq!(min_of(text(&ms.to_string())), Ok(MinAsOf::Millis(ms)));
        }
    }
}
