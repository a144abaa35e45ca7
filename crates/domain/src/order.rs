use std::cmp::Ordering;

use bson::{Bson, Document};

use crate::ids::integral;

/// Where a call stands in a status group: most recent `start_time` first,
/// a call without a `start_time` after every dated call, ties by `id`
/// descending. This is MongoDB's `{start_time: -1, id: -1}` sort for the data
/// the contract allows (a BSON date or nothing in `start_time`, an integer
/// `id`); a `start_time` of another type is treated as missing.
///
/// `Ord` is the response order: sorting ascending puts the first call shown
/// first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallOrder {
    /// `start_time` in milliseconds since the epoch.
    pub start_ms: Option<i64>,
    pub id: i64,
}

impl CallOrder {
    pub fn of(call: &Document) -> Self {
        Self {
            start_ms: match call.get("start_time") {
                Some(Bson::DateTime(d)) => Some(d.timestamp_millis()),
                _ => None,
            },
            id: call.get("id").and_then(integral).unwrap_or(i64::MIN),
        }
    }
}

impl Ord for CallOrder {
    fn cmp(&self, other: &Self) -> Ordering {
        // Descending on (start, id) where a missing start is the smallest.
        let start = match (self.start_ms, other.start_ms) {
            (Some(a), Some(b)) => b.cmp(&a),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        start.then_with(|| other.id.cmp(&self.id))
    }
}

impl PartialOrd for CallOrder {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn o(start_ms: Option<i64>, id: i64) -> CallOrder {
        CallOrder { start_ms, id }
    }

    #[test]
    fn newest_first_undated_last_ties_by_id_desc() {
        let mut v = vec![o(None, 9), o(Some(10), 1), o(Some(20), 2), o(Some(10), 3), o(None, 10)];
        v.sort();
        assert_eq!(v, vec![o(Some(20), 2), o(Some(10), 3), o(Some(10), 1), o(None, 10), o(None, 9)]);
    }

    proptest! {
        #[test]
        fn order_is_total_and_consistent(a in (proptest::option::of(any::<i64>()), any::<i64>()),
                                         b in (proptest::option::of(any::<i64>()), any::<i64>())) {
            let (x, y) = (o(a.0, a.1), o(b.0, b.1));
            prop_assert_eq!(x.cmp(&y), y.cmp(&x).reverse());
            prop_assert_eq!(x.cmp(&y) == Ordering::Equal, x == y);
        }
    }
}
