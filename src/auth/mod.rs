//! JWT verification. The algorithm is pinned by the configured key (an HS512 token is
//! refused when HS256 is configured, an HS256 token signed with an RSA public key is
//! refused when RS256 is), `exp` is required, `nbf`, `iss` and `aud` are checked when
//! present or configured, and the leeway is explicit (5 s by default, not the crate's 60).

pub mod claims;
pub mod jwks;
pub mod keys;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

pub use self::claims::Claims;
pub use self::keys::{KeyError, KeySource};
use crate::config::JwtConfig;
use crate::domain::UserId;

/// Longest token accepted; real ones are well under 2 KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Who a verified token speaks for, and until when.
#[derive(Clone, Debug)]
pub struct Identity {
    pub user: UserId,
    pub claims: Claims,
    /// `exp`, seconds since the epoch.
    pub expires_at: u64,
}

impl Identity {
    /// Time left before `exp` (zero when past).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(unix_now()))
    }
}

/// Why a token was refused. The message is safe to send to the client: it describes the
/// token, never echoes it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is too large")]
    TooLarge,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token algorithm is not the configured one")]
    WrongAlgorithm,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token lacks the required claim {0}")]
    MissingClaim(String),
    #[error("token is signed with an unknown key")]
    UnknownKey,
}

/// Verifies tokens against the configured key(s).
pub struct Verifier {
    keys: KeySource,
    issuer: Option<String>,
    audience: Vec<String>,
    leeway: Duration,
    user_claim: String,
}

impl Verifier {
    pub fn from_config(config: &JwtConfig) -> Result<Self, KeyError> {
        Ok(Self {
            keys: KeySource::from_config(config)?,
            issuer: config.jwt_issuer.clone(),
            audience: config
                .jwt_audience
                .iter()
                .filter(|a| !a.is_empty())
                .cloned()
                .collect(),
            leeway: config.jwt_leeway,
            user_claim: config.user_claim.clone(),
        })
    }

    /// Fetches remote keys (JWKS URL) once, so that a wrong URL shows at start.
    pub async fn prefetch(&self) {
        self.keys.prefetch().await;
    }

    /// Clock skew tolerated on `exp`: a socket is closed this long after its token's `exp`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// The claim naming the user (`sub` by default).
    pub fn user_claim(&self) -> &str {
        &self.user_claim
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let (key, algorithm) = self.keys.key_for(&header).await?;
        if header.alg != algorithm {
            return Err(AuthError::WrongAlgorithm);
        }
        let validation = self.validation(algorithm);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(classify)?;
        let claims = data.claims;
        let user = match claims.get(&self.user_claim) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => UserId::new(s),
            Some(Value::Number(n)) => UserId::new(&n.to_string()),
            _ => return Err(AuthError::MissingClaim(self.user_claim.clone())),
        };
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
        Ok(Identity {
            user,
            claims: Claims::from_token_claims(&claims),
            expires_at,
        })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if self.audience.is_empty() {
            // Not configured: a token's `aud` (Supabase puts "authenticated") is not ours
            // to judge.
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audience);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation
    }
}

fn classify(error: jsonwebtoken::errors::Error) -> AuthError {
    match error.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim.clone()),
        ErrorKind::InvalidClaimFormat(claim) => AuthError::MissingClaim(claim.clone()),
        _ => AuthError::Malformed,
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Shared by the HTTP layer.
pub type SharedVerifier = Arc<Verifier>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{JwtConfig, Secret};
    use proptest::prelude::*;

    fn verifier() -> Verifier {
        Verifier::from_config(&JwtConfig {
            jwt_secret: Some(Secret::new("a-test-secret-of-at-least-32-bytes!!")),
            jwt_public_key_file: None,
            jwt_jwks_file: None,
            jwt_jwks_url: None,
            jwt_jwks_min_refresh: Duration::from_secs(30),
            jwt_algorithm: None,

            jwt_issuer: None,
            jwt_audience: Vec::new(),
            jwt_leeway: Duration::from_secs(5),
            user_claim: "sub".into(),
        })
        .expect("valid key")
    }

    fn b64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
                << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_000))]

        /// Any token text is refused with a defined error (none of these is signed).
        #[test]
        fn arbitrary_tokens_are_refused_without_panicking(token in any::<String>()) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            prop_assert!(runtime.block_on(verifier().verify(&token)).is_err());
        }

        /// Well-formed three-part tokens with arbitrary header and claims bytes, huge
        /// numbers included, are refused with a defined error.
        #[test]
        fn structured_garbage_is_refused_without_panicking(
            header in prop::collection::vec(any::<u8>(), 0..128),
            claims in prop::collection::vec(any::<u8>(), 0..256),
            exp in prop_oneof![Just("1e999".to_owned()), Just("-1".to_owned()), Just("18446744073709551616".to_owned()), Just("\"x\"".to_owned())],
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let garbage = format!("{}.{}.{}", b64(&header), b64(&claims), b64(b"sig"));
            prop_assert!(runtime.block_on(verifier().verify(&garbage)).is_err());
            let with_exp = format!(
                "{}.{}.{}",
                b64(br#"{"alg":"HS256","typ":"JWT"}"#),
                b64(format!(r#"{{"sub":"a","exp":{exp}}}"#).as_bytes()),
                b64(b"sig")
            );
            prop_assert!(runtime.block_on(verifier().verify(&with_exp)).is_err());
        }
    }
}
