//! Bearer tokens on writes: a JWT signed with HS256 (a shared secret of at
//! least 32 bytes) or EdDSA (an Ed25519 public key in PEM). Required claims
//! are `sub` and `exp`, with 5 s of clock leeway; `aud` and `iss` are checked
//! only when configured. The token's `sub` becomes the events' `Actor`.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};
use servicekit::Problem;

/// Shortest HS256 secret: RFC 7518 3.2 wants a key at least as long as the
/// hash output.
pub const SECRET_BYTES_MIN: usize = 32;
/// Clock leeway on `exp` (and `nbf` when present).
pub const LEEWAY_SECS: u64 = 5;
/// Longest `sub`: the command services' bound on the `Actor` header.
pub const SUB_BYTES_MAX: usize = 255;

/// How tokens are checked.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

/// Where the verifying key comes from, and the optional claims to check.
#[derive(Debug, Clone, Default)]
pub struct KeyConfig {
    pub secret: Option<String>,
    pub public_key_file: Option<std::path::PathBuf>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    /// Optional here so that its absence reads as such, not as malformed.
    #[serde(default)]
    sub: Option<String>,
}

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

impl Verifier {
    /// # Errors
    /// Neither or both of a secret and a key file, a short secret, or a key
    /// file that cannot be read or is no Ed25519 public key.
    pub fn new(config: &KeyConfig) -> anyhow::Result<Self> {
        let (key, algorithm) = match (&config.secret, &config.public_key_file) {
            (Some(secret), None) => (
                DecodingKey::from_secret(checked_secret(secret)?)?,
                Algorithm::HS256,
            ),
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
                let key = DecodingKey::from_ed_pem(&pem).map_err(|e| {
                    anyhow::anyhow!("{} is not an Ed25519 public key: {e}", path.display())
                })?;
                (key, Algorithm::EdDSA)
            }
            (None, None) => anyhow::bail!(
                "writes need a token key: set GATEWAY_JWT_SECRET (HS256, at least \
                 {SECRET_BYTES_MIN} bytes) or GATEWAY_JWT_PUBLIC_KEY_FILE (EdDSA, PEM)"
            ),
            (Some(_), Some(_)) => anyhow::bail!(
                "set one of GATEWAY_JWT_SECRET and GATEWAY_JWT_PUBLIC_KEY_FILE, not both"
            ),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Self { key, validation })
    }

    /// The `sub` of a valid `Authorization: Bearer` token.
    ///
    /// # Errors
    /// The 401 to answer with, saying what is wrong.
    pub fn check(&self, headers: &HeaderMap) -> Result<String, Unauthorized> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(Unauthorized::missing());
        };
        let value = value
            .to_str()
            .map_err(|_| Unauthorized::invalid("the Authorization header is not ASCII"))?;
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => {
                return Err(Unauthorized::invalid(
                    "the Authorization header must be \"Bearer <token>\"",
                ));
            }
        };
        if let Err(e) = jsonwebtoken::decode_header(token) {
            return Err(Unauthorized::invalid(&format!(
                "the token's header is malformed or names an unsupported algorithm: {}",
                reason(e.kind())
            )));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| Unauthorized::invalid(&reason(e.kind())))?;
        let Some(sub) = data.claims.sub else {
            return Err(Unauthorized::invalid("the token has no sub claim"));
        };
        if sub.is_empty()
            || sub.len() > SUB_BYTES_MAX
            || !sub.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(Unauthorized::invalid(&format!(
                "the token's sub must be 1..={SUB_BYTES_MAX} printable ASCII characters"
            )));
        }
        Ok(sub)
    }
}

fn checked_secret(secret: &str) -> anyhow::Result<&[u8]> {
    if secret.len() < SECRET_BYTES_MIN {
        anyhow::bail!(
            "GATEWAY_JWT_SECRET is {} bytes; HS256 needs at least {SECRET_BYTES_MIN}",
            secret.len()
        );
    }
    Ok(secret.as_bytes())
}

fn reason(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
        ErrorKind::InvalidAlgorithm => "the token is signed with another algorithm".into(),
        ErrorKind::InvalidAudience => "the token is for another audience".into(),
        ErrorKind::InvalidIssuer => "the token is from another issuer".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("the token's {claim} claim is malformed"),
        ErrorKind::Json(e) => format!("the token is malformed: {e}"),
        _ => "the token is malformed".into(),
    }
}

/// Signs a token for `sub`, valid for `ttl_secs`, with the HS256 `secret`:
/// what `just token NAME` prints.
///
/// # Errors
/// A short secret.
pub fn mint(
    secret: &str,
    sub: &str,
    ttl_secs: u64,
    audience: Option<&str>,
    issuer: Option<&str>,
) -> anyhow::Result<String> {
    let key = EncodingKey::from_secret(checked_secret(secret)?)?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = MintClaims {
        sub,
        exp: now + ttl_secs,
        iat: now,
        aud: audience,
        iss: issuer,
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &key,
    )?)
}

/// A 401 problem with its `WWW-Authenticate` challenge (RFC 6750 3).
#[derive(Debug)]
pub struct Unauthorized {
    detail: String,
    /// No credentials at all: the challenge carries no error code.
    missing: bool,
}

impl Unauthorized {
    fn missing() -> Self {
        Self {
            detail: "this route needs an Authorization: Bearer <token> header".into(),
            missing: true,
        }
    }

    fn invalid(detail: &str) -> Self {
        Self {
            detail: detail.into(),
            missing: false,
        }
    }
}

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        let challenge = if self.missing {
            "Bearer realm=\"gateway\"".to_string()
        } else {
            // A quoted-string: no quote or backslash in the description.
            let description: String = self
                .detail
                .chars()
                .filter(|c| *c != '"' && *c != '\\')
                .collect();
            format!(
                "Bearer realm=\"gateway\", error=\"invalid_token\", error_description=\"{description}\""
            )
        };
        let mut resp =
            Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", self.detail).into_response();
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        // The body was never read: the connection cannot be reused.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier(audience: Option<&str>) -> Verifier {
        Verifier::new(&KeyConfig {
            secret: Some(SECRET.into()),
            audience: audience.map(str::to_string),
            ..KeyConfig::default()
        })
        .expect("verifier")
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        h
    }

    #[test]
    fn a_minted_token_verifies_and_yields_its_sub() {
        let token = mint(SECRET, "alice", 60, None, None).expect("mint");
        assert_eq!(
            verifier(None).check(&bearer(&token)).expect("valid"),
            "alice"
        );
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert!(mint("short", "alice", 60, None, None).is_err());
        let err = Verifier::new(&KeyConfig {
            secret: Some("short".into()),
            ..KeyConfig::default()
        })
        .err()
        .expect("refused");
        assert!(err.to_string().contains("at least 32"), "{err}");
    }

    #[test]
    fn no_header_and_another_scheme_are_refused() {
        let v = verifier(None);
        let e = v.check(&HeaderMap::new()).expect_err("no header");
        assert!(e.missing);
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YTpi"),
        );
        assert!(!v.check(&h).expect_err("basic").missing);
    }

    #[test]
    fn a_configured_audience_is_required() {
        let token = mint(SECRET, "alice", 60, Some("other"), None).expect("mint");
        let e = verifier(Some("posts"))
            .check(&bearer(&token))
            .expect_err("aud");
        assert!(e.detail.contains("audience"), "{}", e.detail);
        let token = mint(SECRET, "alice", 60, Some("posts"), None).expect("mint");
        assert!(verifier(Some("posts")).check(&bearer(&token)).is_ok());
    }
}
