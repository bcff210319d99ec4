//! Where verification keys come from: an HS256 secret, an RS256/ES256 PEM public key, or a
//! JWKS file or URL (keys chosen by `kid`). Each key carries the one algorithm it may
//! verify.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Header};

use super::jwks::RemoteJwks;
use super::AuthError;
use crate::config::{JwtAlgorithm, JwtConfig};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no JWT key configured: set RELAY_JWT_SECRET (HS256), RELAY_JWT_PUBLIC_KEY_FILE (RS256/ES256), RELAY_JWT_JWKS_FILE or RELAY_JWT_JWKS_URL"
    )]
    NoneConfigured,
    #[error("configure exactly one of RELAY_JWT_SECRET, RELAY_JWT_PUBLIC_KEY_FILE, RELAY_JWT_JWKS_FILE and RELAY_JWT_JWKS_URL")]
    SeveralConfigured,
    #[error(
        "RELAY_JWT_SECRET is shorter than 32 bytes: HS256 secrets that short can be brute-forced"
    )]
    WeakSecret,
    #[error("RELAY_JWT_ALGORITHM {0} does not fit the configured key")]
    AlgorithmMismatch(&'static str),
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not an RSA or EC (P-256) public key in PEM form")]
    BadPem { path: PathBuf },
    #[error("{path} is not a JWKS document: {error}")]
    BadJwks { path: PathBuf, error: String },
    #[error("RELAY_JWT_JWKS_URL {url:?} cannot be used: {why}")]
    BadJwksUrl { url: String, why: String },
}

/// One usable key and the algorithm pinned to it.
#[derive(Clone)]
pub struct PinnedKey {
    key: DecodingKey,
    algorithm: Algorithm,
}

pub enum KeySource {
    /// A single key: any `kid` in the header is ignored.
    Single(PinnedKey),
    /// Keys by `kid`; a token without `kid` is accepted only when the set has one key.
    Jwks(Vec<(Option<String>, PinnedKey)>),
    /// Keys by `kid` from a URL, refetched (at a bounded rate) on an unknown `kid`.
    Remote(Box<RemoteJwks>),
}

impl KeySource {
    pub fn from_config(config: &JwtConfig) -> Result<Self, KeyError> {
        let configured = [
            config.jwt_secret.is_some(),
            config.jwt_public_key_file.is_some(),
            config.jwt_jwks_file.is_some(),
            config.jwt_jwks_url.is_some(),
        ]
        .iter()
        .filter(|&&set| set)
        .count();
        match configured {
            0 => return Err(KeyError::NoneConfigured),
            1 => {}
            _ => return Err(KeyError::SeveralConfigured),
        }
        if let Some(secret) = &config.jwt_secret {
            if let Some(other) = config.jwt_algorithm.filter(|a| *a != JwtAlgorithm::Hs256) {
                return Err(KeyError::AlgorithmMismatch(algorithm_name(other)));
            }
            if secret.expose().len() < 32 {
                return Err(KeyError::WeakSecret);
            }
            let key = DecodingKey::from_secret(secret.expose().as_bytes())
                .map_err(|_| KeyError::WeakSecret)?;
            return Ok(Self::Single(PinnedKey {
                key,
                algorithm: Algorithm::HS256,
            }));
        }
        if let Some(path) = &config.jwt_public_key_file {
            return Ok(Self::Single(pem_key(path, config.jwt_algorithm)?));
        }
        // A JWKS pins each key to the algorithm it declares (or its type implies).
        if config.jwt_algorithm == Some(JwtAlgorithm::Hs256) {
            return Err(KeyError::AlgorithmMismatch("HS256"));
        }
        if let Some(url) = &config.jwt_jwks_url {
            return Ok(Self::Remote(Box::new(RemoteJwks::new(
                url,
                config.jwt_jwks_min_refresh,
            )?)));
        }
        match &config.jwt_jwks_file {
            Some(path) => Ok(Self::Jwks(jwks_keys(path)?)),
            None => Err(KeyError::NoneConfigured),
        }
    }

    /// Fetches remote keys once at start (a wrong URL shows in the log at once); a no-op
    /// for the other sources.
    pub async fn prefetch(&self) {
        if let Self::Remote(remote) = self {
            remote.prefetch().await;
        }
    }

    /// The key for a token's header, with the algorithm it is pinned to.
    pub async fn key_for(&self, header: &Header) -> Result<(DecodingKey, Algorithm), AuthError> {
        let pinned = match self {
            Self::Remote(remote) => {
                let pinned = remote
                    .key(header.kid.as_deref())
                    .await
                    .ok_or(AuthError::UnknownKey)?;
                return Ok((pinned.key, pinned.algorithm));
            }
            Self::Single(pinned) => pinned,
            Self::Jwks(keys) => match &header.kid {
                Some(kid) => keys
                    .iter()
                    .find(|(id, _)| id.as_deref() == Some(kid.as_str()))
                    .map(|(_, key)| key)
                    .ok_or(AuthError::UnknownKey)?,
                None if keys.len() == 1 => &keys[0].1,
                None => return Err(AuthError::UnknownKey),
            },
        };
        Ok((pinned.key.clone(), pinned.algorithm))
    }
}

fn algorithm_name(algorithm: JwtAlgorithm) -> &'static str {
    match algorithm {
        JwtAlgorithm::Hs256 => "HS256",
        JwtAlgorithm::Rs256 => "RS256",
        JwtAlgorithm::Es256 => "ES256",
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|error| KeyError::Read {
        path: path.to_owned(),
        error,
    })
}

fn pem_key(path: &Path, wanted: Option<JwtAlgorithm>) -> Result<PinnedKey, KeyError> {
    let pem = read(path)?;
    let rsa = || {
        DecodingKey::from_rsa_pem(&pem).ok().map(|key| PinnedKey {
            key,
            algorithm: Algorithm::RS256,
        })
    };
    let ec = || {
        DecodingKey::from_ec_pem(&pem).ok().map(|key| PinnedKey {
            key,
            algorithm: Algorithm::ES256,
        })
    };
    let found = match wanted {
        Some(JwtAlgorithm::Rs256) => rsa(),
        Some(JwtAlgorithm::Es256) => ec(),
        Some(JwtAlgorithm::Hs256) => return Err(KeyError::AlgorithmMismatch("HS256")),
        None => rsa().or_else(ec),
    };
    found.ok_or_else(|| KeyError::BadPem {
        path: path.to_owned(),
    })
}

fn jwks_keys(path: &Path) -> Result<Vec<(Option<String>, PinnedKey)>, KeyError> {
    let text = read(path)?;
    let bad = |error: String| KeyError::BadJwks {
        path: path.to_owned(),
        error,
    };
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let keys: Vec<_> = set.keys.iter().filter_map(pinned_from_jwk).collect();
    if keys.is_empty() {
        return Err(bad("no usable RS256 or ES256 signing key".into()));
    }
    Ok(keys)
}

/// A JWK's algorithm: the declared `alg` if it is one we verify, else the one its key
/// type implies. Keys for other algorithms (or for encryption) are skipped.
pub(crate) fn pinned_from_jwk(jwk: &Jwk) -> Option<(Option<String>, PinnedKey)> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return None,
    };
    let algorithm = match jwk.common.key_algorithm {
        None => implied,
        Some(KeyAlgorithm::RS256) if implied == Algorithm::RS256 => Algorithm::RS256,
        Some(KeyAlgorithm::ES256) if implied == Algorithm::ES256 => Algorithm::ES256,
        Some(_) => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((jwk.common.key_id.clone(), PinnedKey { key, algorithm }))
}
