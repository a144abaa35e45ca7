use std::collections::HashSet;
use std::fmt;

/// The largest `limit` any configuration may allow: the read model keeps this
/// many calls per status, and responses stay bounded.
pub const MAX_LIMIT_CEILING: u32 = 1000;

/// How many calls a status group may show: an integer in `1..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Limit(u32);

impl Limit {
    /// `value` must lie in `1..=max`.
    pub fn new(value: i64, max: u32) -> Result<Self, ParamError> {
        if value < 1 || value > i64::from(max) {
            return Err(ParamError::new("limit", format!("limit must be an integer between 1 and {max}, got {value}")));
        }
        Ok(Self(value as u32))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    pub fn as_usize(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A request parameter whose value is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

impl ParamError {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { param: param.into(), message: message.into() }
    }
}

/// A parameter value as a client sent it: form fields and query strings
/// carry text, a JSON body carries typed values.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// null, an array or an object: never a valid value here.
    Other(&'static str),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Text(s) => write!(f, "{s:?}"),
            ParamValue::Int(n) => write!(f, "{n}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Other(kind) => f.write_str(kind),
        }
    }
}

/// What a client asks of `get-grouped-by-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupedRequest {
    pub limit: Limit,
    /// `false`: each group's `calls` holds call ids only.
    pub include_enrichment: bool,
    /// `false`: counts only, every `calls` is empty.
    pub include_calls: bool,
}

impl GroupedRequest {
    /// The parameters this endpoint reads; any other is ignored.
    pub fn is_parameter(name: &str) -> bool {
        matches!(name, "limit" | "include_enrichment" | "include_calls")
    }

    /// Builds a request from parameters, however they were sent.
    ///
    /// Unknown parameters are ignored, as the endpoint this replaces did;
    /// a known parameter given twice is an error, since which one wins would
    /// be a guess.
    pub fn from_params<I>(params: I, default_limit: Limit, max_limit: u32) -> Result<Self, ParamError>
    where
        I: IntoIterator<Item = (String, ParamValue)>,
    {
        let mut request = Self { limit: default_limit, include_enrichment: true, include_calls: true };
        let mut seen = HashSet::new();
        for (name, value) in params {
            if !Self::is_parameter(&name) {
                continue;
            }
            if !seen.insert(name.clone()) {
                return Err(ParamError::new(&name, format!("{name} is given more than once")));
            }
            match name.as_str() {
                "limit" => request.limit = parse_limit(&value, max_limit)?,
                "include_enrichment" => request.include_enrichment = parse_bool(&name, &value)?,
                _ => request.include_calls = parse_bool(&name, &value)?,
            }
        }
        Ok(request)
    }
}

fn parse_limit(value: &ParamValue, max: u32) -> Result<Limit, ParamError> {
    let invalid = || ParamError::new("limit", format!("limit must be an integer between 1 and {max}, got {value}"));
    match value {
        ParamValue::Int(n) => Limit::new(*n, max),
        ParamValue::Text(s) if is_decimal_integer(s) => {
            s.parse::<i64>().map_err(|_| invalid()).and_then(|n| Limit::new(n, max))
        }
        _ => Err(invalid()),
    }
}

/// `-?[0-9]+`: what a person means by an integer, without Rust's `+` prefix
/// or any white space.
fn is_decimal_integer(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn parse_bool(name: &str, value: &ParamValue) -> Result<bool, ParamError> {
    match value {
        ParamValue::Bool(b) => Ok(*b),
        ParamValue::Text(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        ParamValue::Text(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(ParamError::new(name, format!("{name} must be \"true\" or \"false\", got {value}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(pairs: &[(&str, ParamValue)]) -> Result<GroupedRequest, ParamError> {
        let default = Limit::new(100, 1000).unwrap();
        GroupedRequest::from_params(pairs.iter().map(|(k, v)| (k.to_string(), v.clone())), default, 1000)
    }

    fn text(s: &str) -> ParamValue {
        ParamValue::Text(s.to_string())
    }

    #[test]
    fn defaults() {
        let r = parse(&[]).unwrap();
        assert_eq!((r.limit.get(), r.include_enrichment, r.include_calls), (100, true, true));
    }

    #[test]
    fn accepts_text_and_typed_values() {
        let r = parse(&[
            ("limit", text("50")),
            ("include_enrichment", text("False")),
            ("include_calls", ParamValue::Bool(false)),
        ])
        .unwrap();
        assert_eq!((r.limit.get(), r.include_enrichment, r.include_calls), (50, false, false));
        assert_eq!(parse(&[("limit", ParamValue::Int(1000))]).unwrap().limit.get(), 1000);
        assert_eq!(parse(&[("limit", text("1"))]).unwrap().limit.get(), 1);
    }

    #[test]
    fn rejects_bad_values_naming_the_parameter() {
        for bad in ["0", "-1", "1001", "abc", "1.5", "", " 5", "+5", "99999999999999999999"] {
            let err = parse(&[("limit", text(bad))]).unwrap_err();
            assert_eq!(err.param, "limit", "{bad:?}");
            assert!(err.message.contains("between 1 and 1000"), "{}", err.message);
        }
        for bad in [ParamValue::Float(1.5), ParamValue::Float(5.0), ParamValue::Bool(true), ParamValue::Other("null")] {
            assert_eq!(parse(&[("limit", bad.clone())]).unwrap_err().param, "limit", "{bad:?}");
        }
        let err = parse(&[("include_enrichment", text("maybe"))]).unwrap_err();
        assert_eq!(err.param, "include_enrichment");
        assert_eq!(err.message, "include_enrichment must be \"true\" or \"false\", got \"maybe\"");
    }

    #[test]
    fn duplicates_are_rejected_unknowns_ignored() {
        assert_eq!(parse(&[("limit", text("5")), ("limit", text("6"))]).unwrap_err().param, "limit");
        assert_eq!(parse(&[("colour", text("red"))]).unwrap().limit.get(), 100);
    }

    proptest! {
        #[test]
        fn limit_accepts_exactly_1_to_max(n in -5_000i64..5_000) {
            let r = parse(&[("limit", text(&n.to_string()))]);
            prop_assert_eq!(r.is_ok(), (1..=1000).contains(&n));
            if let Ok(r) = r { prop_assert_eq!(i64::from(r.limit.get()), n); }
        }
    }
}
