//! The device's Ed25519 identity: created once, kept in the state directory
//! (`device.key`, hex of the 32-byte secret, mode 0600).

use std::path::{Path, PathBuf};

use fedge_proto::sign::SigningKey;

use fedge_proto::io::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read device key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write device key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("device key {path} is corrupt: expected 64 hex digits")]
    Corrupt { path: PathBuf },
    #[error("no system randomness: {0}")]
    Random(String),
}

pub const KEY_FILE: &str = "device.key";

/// Load the key in `state_dir`, or create and store a new one.
pub fn load_or_create(state_dir: &Path) -> Result<SigningKey, IdentityError> {
    let path = state_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let bytes =
                hex::decode(s.trim()).map_err(|_| IdentityError::Corrupt { path: path.clone() })?;
            let seed: [u8; 32] = bytes
                .try_into()
                .map_err(|_| IdentityError::Corrupt { path: path.clone() })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
            write_atomic(&path, hex::encode(seed).as_bytes(), Some(0o600)).map_err(|source| {
                IdentityError::Write {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        std::fs::write(dir.path().join(KEY_FILE), "zz").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
    }
}
