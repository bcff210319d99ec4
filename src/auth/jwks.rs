//! Keys from a JWKS URL (an identity provider's `/.well-known/jwks.json`), chosen by `kid`.
//!
//! Identity providers rotate keys by publishing a new `kid` next to the old one, then
//! signing with it. So a token naming a `kid` we do not know is the signal to fetch the set
//! again, and keys older than [`MAX_AGE`] are refetched too (a key removed from the set,
//! i.e. revoked, stops verifying). Both are bounded: at most one fetch per `min_refresh`
//! whatever arrives, so tokens with made-up `kid`s cannot turn the relay into a load
//! generator against the provider. A failed fetch keeps the keys we had.
//!
//! The cache belongs to one URL, hence to one issuer: keys are looked up by `kid` within
//! it, and the token's `iss` is checked after the signature, as for every other key.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use jsonwebtoken::jwk::JwkSet;

use super::keys::{pinned_from_jwk, KeyError, PinnedKey};

/// Keys older than this are fetched again at the next verification.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// One fetch, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted (real ones are a few KiB).
const MAX_BODY_BYTES: usize = 1024 * 1024;

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A JWKS fetched over HTTP(S), cached, refreshed at a bounded rate.
pub struct RemoteJwks {
    url: axum::http::Uri,
    client: HttpClient,
    min_refresh: Duration,
    /// The keys of the last successful fetch. A std lock: never held across an await.
    cache: RwLock<Cached>,
    /// One fetch at a time; whoever waits for it then finds the fresh keys (or the
    /// too-recent attempt) and does not fetch again.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Cached {
    by_kid: HashMap<String, PinnedKey>,
    /// Keys without a `kid`: usable for a token without one when it is the only key.
    anonymous: Vec<PinnedKey>,
    fetched_at: Option<Instant>,
    /// Last fetch started, successful or not: the rate limit counts failures too.
    attempted_at: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Request(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("not a JWKS document: {0}")]
    Document(String),
    #[error("no usable RS256 or ES256 signing key in the set")]
    NoUsableKey,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl RemoteJwks {
    pub fn new(url: &str, min_refresh: Duration) -> Result<Self, KeyError> {
        let bad = |why: &str| KeyError::BadJwksUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let uri: axum::http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") => {
                let loopback = matches!(uri.host(), Some("localhost" | "127.0.0.1" | "[::1]"));
                if !loopback {
                    tracing::warn!(
                        "RELAY_JWT_JWKS_URL is plain http: whoever sits on the path can hand the relay their own keys"
                    );
                }
            }
            _ => return Err(bad("the scheme must be https (or http)")),
        }
        if uri.host().is_none() {
            return Err(bad("no host"));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| bad(&format!("no TLS root certificates: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Ok(Self {
            url: uri,
            client,
            min_refresh,
            cache: RwLock::new(Cached::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// Fetches the set once (at start), so that a wrong URL shows in the log at once.
    pub async fn prefetch(&self) {
        self.refresh().await;
    }

    /// The key a token's `kid` names: from the cache, or after one (rate-limited) refresh
    /// when it is unknown or the cache is old. `None` when no key fits.
    pub async fn key(&self, kid: Option<&str>) -> Option<PinnedKey> {
        let (found, stale) = self.lookup(kid);
        if found.is_some() && !stale {
            return found;
        }
        // A successful fetch replaces the set (a key removed from it stops verifying);
        // a failed or rate-limited one leaves the keys we had.
        self.refresh().await;
        self.lookup(kid).0
    }

    fn lookup(&self, kid: Option<&str>) -> (Option<PinnedKey>, bool) {
        let Ok(cache) = self.cache.read() else {
            return (None, true);
        };
        let stale = cache.fetched_at.is_none_or(|at| at.elapsed() >= MAX_AGE);
        let found = match kid {
            Some(kid) => cache.by_kid.get(kid).cloned(),
            None if cache.by_kid.len() + cache.anonymous.len() == 1 => cache
                .by_kid
                .values()
                .chain(cache.anonymous.iter())
                .next()
                .cloned(),
            None => None,
        };
        (found, stale)
    }

    /// Fetches the set unless a fetch started less than `min_refresh` ago.
    async fn refresh(&self) {
        let _one_at_a_time = self.fetching.lock().await;
        {
            let Ok(mut cache) = self.cache.write() else {
                return;
            };
            if let Some(at) = cache.attempted_at {
                if at.elapsed() < self.min_refresh {
                    // Someone fetched a moment ago (perhaps while we waited): their
                    // answer is the freshest there is.
                    return;
                }
            }
            cache.attempted_at = Some(Instant::now());
        }
        match self.fetch().await {
            Ok((by_kid, anonymous)) => {
                tracing::info!(keys = by_kid.len() + anonymous.len(), kids = ?by_kid.keys().collect::<Vec<_>>(), "JWKS fetched");
                if let Ok(mut cache) = self.cache.write() {
                    cache.by_kid = by_kid;
                    cache.anonymous = anonymous;
                    cache.fetched_at = Some(Instant::now());
                }
            }
            Err(error) => {
                tracing::warn!(%error, url = %self.url, "cannot fetch the JWKS; keeping the keys already known");
            }
        }
    }

    async fn fetch(&self) -> Result<(HashMap<String, PinnedKey>, Vec<PinnedKey>), FetchError> {
        let request = axum::http::Request::get(self.url.clone())
            .header(axum::http::header::ACCEPT, "application/json")
            .header(axum::http::header::USER_AGENT, "rls-relay")
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::Request(e.to_string()))?;
        let body = tokio::time::timeout(FETCH_TIMEOUT, async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| FetchError::Request(e.to_string()))?;
            if !response.status().is_success() {
                return Err(FetchError::Status(response.status().as_u16()));
            }
            Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .map_err(|e| FetchError::Request(e.to_string()))
        })
        .await
        .map_err(|_| FetchError::Timeout(FETCH_TIMEOUT))??;
        parse_set(&body)
    }
}

/// The usable keys of a JWKS document, by `kid`, and those without one.
pub(crate) fn parse_set(
    document: &[u8],
) -> Result<(HashMap<String, PinnedKey>, Vec<PinnedKey>), FetchError> {
    let set: JwkSet =
        serde_json::from_slice(document).map_err(|e| FetchError::Document(e.to_string()))?;
    let mut by_kid = HashMap::new();
    let mut anonymous = Vec::new();
    for (kid, key) in set.keys.iter().filter_map(pinned_from_jwk) {
        match kid {
            Some(kid) => {
                by_kid.insert(kid, key);
            }
            None => anonymous.push(key),
        }
    }
    if by_kid.is_empty() && anonymous.is_empty() {
        return Err(FetchError::NoUsableKey);
    }
    Ok((by_kid, anonymous))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_urls_are_accepted() {
        assert!(RemoteJwks::new("https://auth.example/.well-known/jwks.json", MAX_AGE).is_ok());
        assert!(RemoteJwks::new("http://127.0.0.1:9/jwks", MAX_AGE).is_ok());
        for bad in ["ftp://auth.example/jwks", "/jwks.json", "not a url"] {
            assert!(RemoteJwks::new(bad, MAX_AGE).is_err(), "{bad}");
        }
    }

    #[test]
    fn documents_without_a_usable_key_are_refused() {
        assert!(matches!(
            parse_set(br#"{"keys":[]}"#),
            Err(FetchError::NoUsableKey)
        ));
        assert!(matches!(parse_set(b"<html>"), Err(FetchError::Document(_))));
    }
}
