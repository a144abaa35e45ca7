//! The write scripts (`src/lua/*.lua`) and the typed builder that feeds
//! `apply.lua` its closed set of operations. Every script starts with
//! `guard.lua` and touches one slot.

use std::collections::HashMap;
use std::sync::OnceLock;

use callboard_domain::StatusKey;

use super::DocWindow;
use crate::conn::Conn;
use crate::ReadModelError;

pub(crate) const APPLY: &str =
    concat!(include_str!("../lua/guard.lua"), include_str!("../lua/version.lua"), include_str!("../lua/apply.lua"));
pub(crate) const FILL: &str =
    concat!(include_str!("../lua/guard.lua"), include_str!("../lua/version.lua"), include_str!("../lua/fill.lua"));
pub(crate) const MARK_WARM: &str = concat!(include_str!("../lua/guard.lua"), include_str!("../lua/mark_warm.lua"));
pub(crate) const REQUEST_WARM: &str = include_str!("../lua/request_warm.lua");
pub(crate) const MARK: &str = concat!(include_str!("../lua/guard.lua"), include_str!("../lua/mark.lua"));

/// A script hashed once per process.
pub(crate) fn script(cell: &'static OnceLock<redis::Script>, source: &'static str) -> &'static redis::Script {
    cell.get_or_init(|| redis::Script::new(source))
}

/// The check a script makes before writing (`guard.lua`): ARGV[1] and
/// ARGV[2], on KEYS[1].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    /// The fence or lease key.
    pub key: String,
    pub mode: &'static str,
    pub value: String,
}

/// One operation of `apply.lua`. Keys are named, and turned into KEYS
/// indexes by [`Batch::push`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    /// Put a call in a status's ZSET, keeping the document window.
    CPut {
        zset: String,
        status: StatusKey,
        score: f64,
        member: Vec<u8>,
        stored: Vec<u8>,
    },
    /// Remove a call from a status's ZSET, keeping the document window.
    CRem {
        zset: String,
        status: StatusKey,
        member: Vec<u8>,
    },
    HSet {
        key: String,
        field: Vec<u8>,
        value: Vec<u8>,
    },
    HDel {
        key: String,
        field: Vec<u8>,
    },
    Set {
        key: String,
        value: Vec<u8>,
    },
    Del {
        key: String,
    },
    HIncrBy {
        key: String,
        field: Vec<u8>,
        by: i64,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::CPut { zset, .. } | Op::CRem { zset, .. } => zset,
            Op::HSet { key, .. } | Op::HDel { key, .. } | Op::Set { key, .. } | Op::Del { key } => key,
            Op::HIncrBy { key, .. } => key,
        }
    }

    /// The name `apply.lua` dispatches on, and the arguments after it
    /// (the first is always the key; `ARITY` in the script counts them).
    fn encode(self, key_index: usize) -> (&'static str, Vec<Vec<u8>>) {
        let k = key_index.to_string().into_bytes();
        match self {
            Op::CPut { status, score, member, stored, .. } => {
                ("CPUT", vec![k, status.get().to_string().into_bytes(), score.to_string().into_bytes(), member, stored])
            }
            Op::CRem { status, member, .. } => ("CREM", vec![k, status.get().to_string().into_bytes(), member]),
            Op::HSet { field, value, .. } => ("HSET", vec![k, field, value]),
            Op::HDel { field, .. } => ("HDEL", vec![k, field]),
            Op::Set { value, .. } => ("SET", vec![k, value]),
            Op::Del { .. } => ("DEL", vec![k]),
            Op::HIncrBy { field, by, .. } => ("HINCRBY", vec![k, field, by.to_string().into_bytes()]),
        }
    }
}

/// Operations gathered for one run of `apply.lua` on one slot.
pub(crate) struct Batch {
    check: Check,
    /// A tenant batch: KEYS[2..4] are its version, documents and windows.
    tenant: bool,
    keys: Vec<String>,
    /// Each key's index in `keys` (a shared batch can name a thousand
    /// locator buckets).
    index: HashMap<String, usize>,
    argv: Vec<Vec<u8>>,
}

impl Batch {
    /// A batch on shared keys (no calls).
    pub fn shared(check: Check) -> Self {
        Self::with_keys(check, false, vec![])
    }

    /// A batch on one tenant's keys: bumps `version` when it changes calls.
    pub fn tenant(check: Check, version: String, docs: String, windows: String) -> Self {
        Self::with_keys(check, true, vec![version, docs, windows])
    }

    /// The check's key is KEYS[1], then `fixed`.
    fn with_keys(check: Check, tenant: bool, fixed: Vec<String>) -> Self {
        let keys: Vec<String> = std::iter::once(check.key.clone()).chain(fixed).collect();
        let index = keys.iter().enumerate().map(|(i, k)| (k.clone(), i + 1)).collect();
        Self { keys, index, check, tenant, argv: Vec::new() }
    }

    /// `key`'s KEYS index (1-based), added if new.
    fn key_index(&mut self, key: &str) -> usize {
        if let Some(i) = self.index.get(key) {
            return *i;
        }
        self.keys.push(key.to_string());
        self.index.insert(key.to_string(), self.keys.len());
        self.keys.len()
    }

    pub fn push(&mut self, op: Op) {
        debug_assert!(self.tenant || !matches!(op, Op::CPut { .. } | Op::CRem { .. }), "calls only in tenant batches");
        let index = self.key_index(op.key());
        let (name, args) = op.encode(index);
        self.argv.push(name.as_bytes().to_vec());
        self.argv.extend(args);
    }

    /// Runs the batch; returns the statuses whose document window fell
    /// short (tenant batches only).
    pub async fn run(self, c: &mut Conn, window: DocWindow) -> Result<Vec<StatusKey>, ReadModelError> {
        static CELL: OnceLock<redis::Script> = OnceLock::new();
        let mut invocation = script(&CELL, APPLY).prepare_invoke();
        for k in &self.keys {
            invocation.key(k);
        }
        invocation.arg(self.check.mode).arg(&self.check.value).arg(window.size).arg(window.floor).arg(if self.tenant {
            "1"
        } else {
            "0"
        });
        for a in &self.argv {
            invocation.arg(a.as_slice());
        }
        let short: Vec<i64> = invocation.invoke_async(c).await.map_err(fenced)?;
        Ok(short.into_iter().map(StatusKey::new).collect())
    }
}

/// A script's `FENCED` error (by its code) as [`ReadModelError::Fenced`].
pub(crate) fn fenced(e: redis::RedisError) -> ReadModelError {
    if e.code() == Some("FENCED") {
        ReadModelError::Fenced
    } else {
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ARITY` in apply.lua against the arguments the builder writes.
    #[test]
    fn the_builder_and_the_script_agree_on_every_operation() {
        let line = include_str!("../lua/apply.lua").lines().find(|l| l.starts_with("local ARITY")).unwrap();
        let table: std::collections::BTreeMap<&str, usize> = line
            .split(['{', '}'])
            .nth(1)
            .unwrap()
            .split(',')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.trim(), v.trim().parse().unwrap())
            })
            .collect();
        let k = || "k".to_string();
        let b = || b"f".to_vec();
        let ops = [
            Op::CPut { zset: k(), status: StatusKey::new(1), score: 1.0, member: vec![1], stored: vec![2] },
            Op::CRem { zset: k(), status: StatusKey::new(1), member: vec![1] },
            Op::HSet { key: k(), field: b(), value: b() },
            Op::HDel { key: k(), field: b() },
            Op::Set { key: k(), value: b() },
            Op::Del { key: k() },
            Op::HIncrBy { key: k(), field: b(), by: 1 },
        ];
        assert_eq!(ops.len(), table.len());
        for op in ops {
            let (name, args) = op.encode(1);
            assert_eq!(table.get(name), Some(&args.len()), "{name}");
        }
    }
}
