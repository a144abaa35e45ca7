//! Bearer tokens: HS256 JWTs carrying `tenant_id`, `exp` and optionally
//! `role: "admin"`. The tenant of a request comes from here and nowhere else.

use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest};
use callboard_domain::TenantId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Member,
    Admin,
}

/// What `mint` signs: the claims, and the audience and issuer the rules
/// require, so that callboard's own tokens pass them.
#[derive(Serialize)]
struct Minted<'a> {
    #[serde(flatten)]
    claims: Claims,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    tenant_id: i64,
    exp: u64,
    /// Typed so that a non-numeric `nbf` fails to decode: rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
}

/// How tokens are checked besides their signature.
#[derive(Debug, Clone, Default)]
pub struct TokenRules {
    /// `aud` must include this; `None` accepts any `aud` (or none).
    pub audience: Option<String>,
    /// `iss` must equal this; `None` accepts any `iss` (or none).
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// One HS256 secret's keys.
#[derive(Clone)]
struct Key {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Key {
    fn new(secret: &[u8]) -> Self {
        Self { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret) }
    }
}

/// Signs and verifies tokens: the tenant secret, and optionally the
/// operator plane's own.
#[derive(Clone)]
pub struct JwtKeys {
    tenant: Key,
    /// When set, only tokens signed with it act as admin.
    admin: Option<Key>,
    validation: Validation,
    rules: TokenRules,
    verified: Arc<Verified>,
}

/// Tokens verified already, by their exact text, with what they proved:
/// a dashboard polling with one token has its signature checked once
/// (HMAC-SHA256, base64 and JSON: about a tenth of a cached hit's CPU)
/// and its times on every request. Only tokens that passed are kept, so a
/// bad token costs what it always did; bounded in bytes, least recently
/// useful first.
type Verified = quick_cache::sync::Cache<Box<str>, Passed, TokenBytes>;

/// What a verified token proved, and the times it holds between.
#[derive(Debug, Clone, Copy)]
struct Passed {
    caller: Caller,
    nbf: Option<u64>,
}

#[derive(Clone)]
struct TokenBytes;

impl quick_cache::Weighter<Box<str>, Passed> for TokenBytes {
    fn weight(&self, token: &Box<str>, _: &Passed) -> u64 {
        // The text, the entry and the map's slot (an estimate).
        token.len() as u64 + 96
    }
}

/// The verified tokens kept per process, in bytes.
const VERIFIED_BYTES: u64 = 4 << 20;

impl JwtKeys {
    /// One secret for every token, with the default rules (any `aud` and
    /// `iss`, no leeway).
    pub fn new(secret: &[u8]) -> Self {
        Self::with_rules(secret, None, &TokenRules::default())
    }

    pub fn with_rules(secret: &[u8], admin_secret: Option<&[u8]>, rules: &TokenRules) -> Self {
        // HS256 only: `alg: none`, other HMACs and every asymmetric
        // algorithm are rejected before the signature is looked at.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = rules.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &rules.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // jsonwebtoken rejects any `aud` unless told which to accept.
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &rules.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let verified = Arc::new(Verified::with_weighter(16_384, VERIFIED_BYTES, TokenBytes));
        Self { tenant: Key::new(secret), admin: admin_secret.map(Key::new), validation, rules: rules.clone(), verified }
    }

    /// A token for `tenant`, valid for `ttl`; an admin one is signed with
    /// the operator secret when there is one.
    pub fn mint(&self, tenant: TenantId, admin: bool, ttl: Duration) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = Claims {
            tenant_id: tenant.get(),
            exp: now + ttl.as_secs(),
            nbf: None,
            iat: Some(now),
            role: admin.then(|| "admin".into()),
        };
        let key = if admin { self.admin.as_ref().unwrap_or(&self.tenant) } else { &self.tenant };
        let minted = Minted { claims, aud: self.rules.audience.as_deref(), iss: self.rules.issuer.as_deref() };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &minted, &key.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        self.verify_at(token, SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
    }

    /// [`Self::verify`] at `now` (Unix seconds). A token verified before
    /// is checked again only against the times, as jsonwebtoken checks
    /// them: `exp` no earlier than `now` less the leeway, `nbf` (if any) no
    /// later than `now` plus it.
    fn verify_at(&self, token: &str, now: u64) -> Result<Caller, ApiError> {
        if let Some(passed) = self.verified.get(token) {
            if now > passed.caller.expires_at_s {
                self.verified.remove(token);
                return Err(reject(ErrorKind::ExpiredSignature.into()));
            }
            if passed.nbf.is_none_or(|nbf| nbf <= now.saturating_add(self.validation.leeway)) {
                return Ok(passed.caller);
            }
        }
        let (caller, nbf) = self.check(token)?;
        self.verified.insert(token.into(), Passed { caller, nbf });
        Ok(caller)
    }

    /// The whole check: signature, claims and times.
    fn check(&self, token: &str) -> Result<(Caller, Option<u64>), ApiError> {
        let decode = |key: &Key| jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation);
        // With an operator secret, a tenant-secret token is a member
        // whatever its `role` says; only the operator secret makes admins.
        let (data, may_admin) = match (decode(&self.tenant), &self.admin) {
            (Ok(data), admin) => (data, admin.is_none()),
            (Err(e), Some(admin)) if *e.kind() == ErrorKind::InvalidSignature => (decode(admin).map_err(reject)?, true),
            (Err(e), _) => return Err(reject(e)),
        };
        let tenant = TenantId::new(data.claims.tenant_id)
            .map_err(|_| ApiError::new(ErrorCode::InvalidToken, "the token's tenant_id is not valid"))?;
        let role = if may_admin && data.claims.role.as_deref() == Some("admin") { Role::Admin } else { Role::Member };
        let caller = Caller { tenant, role, expires_at_s: data.claims.exp.saturating_add(self.validation.leeway) };
        Ok((caller, data.claims.nbf))
    }
}

fn reject(e: jsonwebtoken::errors::Error) -> ApiError {
    match e.kind() {
        ErrorKind::ExpiredSignature => ApiError::new(ErrorCode::TokenExpired, "the token has expired"),
        ErrorKind::ImmatureSignature => ApiError::new(ErrorCode::InvalidToken, "the token is not valid yet (nbf)"),
        ErrorKind::InvalidAudience => {
            ApiError::new(ErrorCode::InvalidToken, "the token is not for this audience (aud)")
        }
        ErrorKind::InvalidIssuer => ApiError::new(ErrorCode::InvalidToken, "the token's issuer (iss) is not accepted"),
        _ => ApiError::new(ErrorCode::InvalidToken, "the token is not valid"),
    }
}

/// Who is asking: a verified tenant and role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub tenant: TenantId,
    pub role: Role,
    /// When the token stops being accepted (`exp` plus the leeway, Unix
    /// seconds): a stream ends then.
    pub expires_at_s: u64,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<Caller, ApiError> {
    let keys = req
        .app_data::<web::Data<JwtKeys>>()
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "authentication is not configured"))?;
    // Two tokens would leave the tenant to whichever is read first.
    if req.headers().get_all(header::AUTHORIZATION).count() > 1 {
        return Err(ApiError::new(
            ErrorCode::InvalidToken,
            "give one token: one Authorization header, or one access_token where accepted",
        ));
    }
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::new(ErrorCode::MissingToken, "an Authorization: Bearer token is required"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::new(ErrorCode::MissingToken, "the Authorization header must be `Bearer <token>`"))?;
    keys.verify(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const SECRET: &[u8] = b"unit-test-tenant-secret-0123456789abcdef";
    const ADMIN: &[u8] = b"unit-test-admin-secret-0123456789abcdef";

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn sign(secret: &[u8], claims: Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    /// The role, or the error's machine name.
    fn outcome(keys: &JwtKeys, secret: &[u8], claims: Value) -> Result<Role, &'static str> {
        keys.verify(&sign(secret, claims)).map(|c| c.role).map_err(|e| e.code.meta().1)
    }

    fn rules(audience: Option<&str>, issuer: Option<&str>, leeway_s: u64) -> TokenRules {
        TokenRules {
            audience: audience.map(str::to_string),
            issuer: issuer.map(str::to_string),
            leeway: Duration::from_secs(leeway_s),
        }
    }

    #[test]
    fn aud_and_iss_are_accepted_unless_configured_then_required() {
        let exp = now() + 600;
        let open = JwtKeys::with_rules(SECRET, None, &rules(None, None, 0));
        for claims in [
            json!({"tenant_id": 1, "exp": exp, "aud": "anything"}),
            json!({"tenant_id": 1, "exp": exp, "aud": ["a", "b"], "iss": "https://idp.example.com/"}),
            json!({"tenant_id": 1, "exp": exp}),
        ] {
            assert_eq!(outcome(&open, SECRET, claims.clone()), Ok(Role::Member), "{claims}");
        }
        let strict = JwtKeys::with_rules(SECRET, None, &rules(Some("callboard"), Some("https://idp/"), 0));
        let cases = [
            (json!({"tenant_id": 1, "exp": exp, "aud": "callboard", "iss": "https://idp/"}), Ok(Role::Member)),
            (json!({"tenant_id": 1, "exp": exp, "aud": ["x", "callboard"], "iss": "https://idp/"}), Ok(Role::Member)),
            (json!({"tenant_id": 1, "exp": exp, "aud": "other", "iss": "https://idp/"}), Err("invalid_token")),
            (json!({"tenant_id": 1, "exp": exp, "iss": "https://idp/"}), Err("invalid_token")),
            (json!({"tenant_id": 1, "exp": exp, "aud": "callboard", "iss": "https://evil/"}), Err("invalid_token")),
            (json!({"tenant_id": 1, "exp": exp, "aud": "callboard"}), Err("invalid_token")),
        ];
        for (claims, expected) in cases {
            assert_eq!(outcome(&strict, SECRET, claims.clone()), expected, "{claims}");
        }
    }

    /// A token verified once is accepted again on its times alone, for
    /// exactly as long as jsonwebtoken would accept it; a token that
    /// differs in one byte, or failed, is checked in full.
    #[test]
    fn a_verified_token_is_reused_only_while_its_times_hold() {
        let keys = JwtKeys::with_rules(SECRET, None, &rules(None, None, 5));
        let (t0, exp) = (now() as u64, now() as u64 + 60);
        let token = sign(SECRET, json!({"tenant_id": 4, "exp": exp, "nbf": t0 - 1}));
        let code = |r: Result<Caller, ApiError>| r.map(|c| c.tenant.get()).map_err(|e| e.code.meta().1);
        assert_eq!(code(keys.verify_at(&token, t0)), Ok(4));
        // Past `exp` by the leeway, only the kept verification can say so:
        // a full check reads the real clock.
        assert_eq!(code(keys.verify_at(&token, exp + 5)), Ok(4), "within the leeway");
        assert_eq!(code(keys.verify_at(&token, exp + 6)), Err("token_expired"));
        assert_eq!(code(keys.verify_at(&token, t0)), Ok(4), "checked in full again, at the real time");
        let mut forged = token.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(code(keys.verify_at(&forged, t0)), Err("invalid_token"), "one byte off");
        assert_eq!(code(keys.verify_at(&forged, t0)), Err("invalid_token"), "a failure is not kept");
        let other = JwtKeys::with_rules(b"another-secret-0123456789abcdef0123", None, &rules(None, None, 5));
        assert_eq!(code(other.verify_at(&token, t0)), Err("invalid_token"), "kept per set of keys");
    }

    #[test]
    fn the_leeway_applies_to_exp_and_nbf_and_nbf_must_be_a_number() {
        let keys = JwtKeys::with_rules(SECRET, None, &rules(None, None, 5));
        let cases = [
            (json!({"tenant_id": 1, "exp": now() - 2}), Ok(Role::Member)),
            (json!({"tenant_id": 1, "exp": now() - 30}), Err("token_expired")),
            (json!({"tenant_id": 1, "exp": now() + 600, "nbf": now() + 2}), Ok(Role::Member)),
            (json!({"tenant_id": 1, "exp": now() + 600, "nbf": now() + 60}), Err("invalid_token")),
            (json!({"tenant_id": 1, "exp": now() + 600, "nbf": "soon"}), Err("invalid_token")),
            (json!({"tenant_id": 1, "exp": now() + 600, "nbf": (now() - 10).to_string()}), Err("invalid_token")),
        ];
        for (claims, expected) in cases {
            assert_eq!(outcome(&keys, SECRET, claims.clone()), expected, "{claims}");
        }
        let strict = JwtKeys::with_rules(SECRET, None, &rules(None, None, 0));
        assert_eq!(outcome(&strict, SECRET, json!({"tenant_id": 1, "exp": now() - 2})), Err("token_expired"));
    }

    #[test]
    fn with_an_operator_secret_only_it_makes_admins() {
        let exp = now() + 600;
        let admin = json!({"tenant_id": 1, "exp": exp, "role": "admin"});
        let shared = JwtKeys::with_rules(SECRET, None, &TokenRules::default());
        assert_eq!(outcome(&shared, SECRET, admin.clone()), Ok(Role::Admin), "one secret: its admins are admins");
        let split = JwtKeys::with_rules(SECRET, Some(ADMIN), &TokenRules::default());
        assert_eq!(outcome(&split, SECRET, admin.clone()), Ok(Role::Member), "the tenant secret cannot make admins");
        assert_eq!(outcome(&split, ADMIN, admin.clone()), Ok(Role::Admin));
        assert_eq!(outcome(&split, b"some-other-secret-0123456789abcdefghij", admin), Err("invalid_token"));
        let minted = split.mint(TenantId::new(3).unwrap(), true, Duration::from_secs(60));
        let strict = JwtKeys::with_rules(SECRET, Some(ADMIN), &rules(Some("callboard"), Some("https://idp/"), 0));
        for admin in [false, true] {
            let own = strict.mint(TenantId::new(4).unwrap(), admin, Duration::from_secs(60));
            assert_eq!(
                strict.verify(&own).map(|c| c.role == Role::Admin).ok(),
                Some(admin),
                "its own tokens pass its rules"
            );
        }
        assert_eq!(split.verify(&minted).map(|c| (c.tenant.get(), c.role)).ok(), Some((3, Role::Admin)));
        assert!(shared.verify(&minted).is_err(), "an admin token is signed with the operator secret");
    }
}

/// Fuzzing of token parsing (`make fuzz` runs many more cases). Whatever
/// the bytes, a token is a caller or a 401; signed claims of any shape are
/// accepted only when the tenant, times and role are valid.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    const SECRET: &[u8] = b"fuzz-test-tenant-secret-0123456789abcdef";

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn is_401(e: &ApiError) -> bool {
        e.code.meta().0 == actix_web::http::StatusCode::UNAUTHORIZED
    }

    /// A claim's value: of the right type or not.
    fn claim() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            any::<i64>().prop_map(|n| Some(json!(n))),
            (-100_000i64..100_000).prop_map(|d| Some(json!(now() + d))),
            (-3i64..5).prop_map(|n| Some(json!(n))),
            "[ -~]{0,8}".prop_map(|s| Some(json!(s))),
            Just(Some(json!(1.5))),
            Just(Some(json!(null))),
            Just(Some(json!([1]))),
            Just(Some(json!("admin"))),
        ]
    }

    proptest! {
        #![proptest_config(crate::fuzz_config())]

        #[test]
        fn arbitrary_text_is_a_401(token in "[ -~]{0,200}") {
            let keys = JwtKeys::new(SECRET);
            let verdict = keys.verify(&token);
            prop_assert!(verdict.as_ref().is_err_and(is_401), "{verdict:?}");
        }

        #[test]
        fn three_arbitrary_base64_parts_are_a_401(
            parts in proptest::collection::vec("[A-Za-z0-9_-]{0,80}", 3),
        ) {
            let token = parts.join(".");
            let verdict = JwtKeys::new(SECRET).verify(&token);
            prop_assert!(verdict.as_ref().is_err_and(is_401), "{verdict:?}");
        }

        #[test]
        fn valid_claims_are_accepted(tenant in 0i64..i64::MAX, ttl in 1i64..100_000, admin in any::<bool>()) {
            let mut claims = json!({"tenant_id": tenant, "exp": now() + ttl});
            if admin {
                claims["role"] = json!("admin");
            }
            let token =
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap();
            let caller = JwtKeys::new(SECRET).verify(&token);
            prop_assert!(caller.as_ref().is_ok_and(|c| c.tenant.get() == tenant && c.is_admin() == admin), "{caller:?}");
        }

        #[test]
        fn signed_claims_of_any_shape_pass_only_when_valid(
            tenant in claim(), exp in claim(), nbf in claim(), role in claim(), aud in claim(),
        ) {
            let mut claims = serde_json::Map::new();
            for (name, value) in [("tenant_id", tenant), ("exp", exp), ("nbf", nbf), ("role", role), ("aud", aud)] {
                if let Some(v) = value {
                    claims.insert(name.into(), v);
                }
            }
            let token = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &Value::Object(claims.clone()),
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap();
            match JwtKeys::new(SECRET).verify(&token) {
                Ok(caller) => {
                    let int = |k: &str| claims.get(k).and_then(Value::as_i64);
                    prop_assert_eq!(Some(caller.tenant.get()), int("tenant_id"));
                    prop_assert!(caller.tenant.get() >= 0);
                    prop_assert!(int("exp").is_some_and(|e| e + 5 > now()), "expired {claims:?}");
                    // `nbf: null` is no constraint, as if absent.
                    let nbf = claims.get("nbf").filter(|n| !n.is_null());
                    prop_assert!(nbf.is_none_or(|n| n.as_i64().is_some_and(|n| n - 5 <= now())), "{claims:?}");
                    let admin = claims.get("role").and_then(Value::as_str) == Some("admin");
                    prop_assert_eq!(caller.is_admin(), admin);
                }
                Err(e) => prop_assert!(is_401(&e), "{e:?}"),
            }
        }
    }
}
