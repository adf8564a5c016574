//! Reading a JWKS document (shared by `auth.jwks_file` and `auth.jwks_url`), and the JWKS
//! file, reloaded when it changes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// The usable keys of a JWKS document: `kid`, key, the algorithm it implies.
pub(super) type Keys = Vec<(Option<String>, DecodingKey, Algorithm)>;

/// A loaded JWKS file.
pub(super) struct JwksCache {
    pub(super) path: PathBuf,
    pub(super) keys: Keys,
    pub(super) modified: Option<SystemTime>,
    pub(super) checked: Instant,
}

/// How often a JWKS file's modification time is checked.
const JWKS_CHECK: Duration = Duration::from_secs(1);

/// Loads a JWKS file: every RSA, P-256 and Ed25519 key, with the algorithm it implies.
pub(super) fn load_jwks(path: &Path) -> Result<Keys, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_jwks(&text, &path.display().to_string())
}

/// Reads a JWKS document (`what` names it in errors): every RSA, P-256 and Ed25519 key
/// meant for signatures (`use` absent or `sig`), with the algorithm it implies.
pub(super) fn parse_jwks(text: &str, what: &str) -> Result<Keys, String> {
    let set: JwkSet =
        serde_json::from_str(text).map_err(|e| format!("{what} is not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        // A key published for encryption must not verify signatures.
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| !matches!(u, PublicKeyUse::Signature))
        {
            continue;
        }
        let implied = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            // Symmetric and other keys have no place in a public key set.
            _ => continue,
        };
        let declared = match jwk.common.key_algorithm {
            None => Some(implied),
            Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
            Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
            Some(KeyAlgorithm::EdDSA) => Some(Algorithm::EdDSA),
            Some(_) => None,
        };
        if declared != Some(implied) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        keys.push((jwk.common.key_id.clone(), key, implied));
    }
    if keys.is_empty() {
        return Err(format!(
            "{what} has no usable key (RSA for RS256, EC P-256 for ES256, OKP Ed25519 for EdDSA, \
             with `use` absent or \"sig\")"
        ));
    }
    Ok(keys)
}

/// The key for a token's `kid`: the one with that `kid`, or the only key when the token
/// names none.
pub(super) fn find<'k>(
    keys: &'k Keys,
    kid: Option<&str>,
) -> Option<&'k (Option<String>, DecodingKey, Algorithm)> {
    match kid {
        Some(kid) => keys.iter().find(|(id, _, _)| id.as_deref() == Some(kid)),
        None if keys.len() == 1 => keys.first(),
        None => None,
    }
}

pub(super) fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl JwksCache {
    /// Reloads the file if it changed since the last check (at most once a second). A
    /// file that became unreadable or invalid keeps the previous keys.
    pub(super) fn refresh(&mut self) {
        if self.checked.elapsed() < JWKS_CHECK {
            return;
        }
        self.checked = Instant::now();
        let now = modified(&self.path);
        if now == self.modified {
            return;
        }
        match load_jwks(&self.path) {
            Ok(keys) => {
                self.keys = keys;
                self.modified = now;
                tracing::info!(path = %self.path.display(), keys = self.keys.len(), "reloaded the JWKS file");
            }
            Err(err) => {
                tracing::warn!(cause = %err, "the JWKS file changed but cannot be loaded; keeping the previous keys")
            }
        }
    }
}
