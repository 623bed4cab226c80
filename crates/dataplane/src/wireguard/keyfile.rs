//! The node's private key: generated once, kept in a file only root can read, in the
//! format `wg genkey` writes so operators can use `wg pubkey < FILE`.

use crate::error::{Error, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use trellis_model::PublicKey;
use x25519_dalek::StaticSecret;

/// Read the private key at `path`, or generate and store one if the file does not exist.
/// A file with looser permissions than 0600 is tightened and reported.
pub fn load_or_generate(path: &Path) -> Result<StaticSecret> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let mode = fs::metadata(path)
                .map_err(|e| Error::io(format!("reading the mode of {}", path.display()), e))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "private key readable by others; setting 0600");
                fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|e| {
                    Error::io(format!("tightening permissions of {}", path.display()), e)
                })?;
            }
            parse(&text)
                .map_err(|e| e.while_doing(|| format!("loading private key {}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = StaticSecret::random();
            store(path, &key)?;
            Ok(key)
        }
        Err(e) => Err(Error::io(
            format!("reading private key {}", path.display()),
            e,
        )),
    }
}

pub fn public_key(secret: &StaticSecret) -> PublicKey {
    PublicKey(x25519_dalek::PublicKey::from(secret).to_bytes())
}

/// The key in `wg genkey` format. The value is never repeated in errors: it is a secret.
fn parse(text: &str) -> Result<StaticSecret> {
    let bytes = STANDARD.decode(text.trim()).map_err(|e| {
        Error::invalid(
            "private key",
            "",
            format!("is not base64 ({e}); expected the output of `wg genkey`"),
        )
    })?;
    let Ok(bytes) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        return Err(Error::invalid(
            "private key",
            "",
            format!("decodes to {} bytes, a WireGuard key has 32", bytes.len()),
        ));
    };
    Ok(StaticSecret::from(bytes))
}

/// Write to a temporary file with mode 0600 from the start, then rename, so the key is
/// never visible to others and never half-written.
fn store(path: &Path, key: &StaticSecret) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    writeln!(file, "{}", STANDARD.encode(key.to_bytes()))
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("storing private key {}", path.display()), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("trellis-key-{tag}-{}/key", std::process::id()))
    }

    #[test]
    fn generates_once_with_0600_and_reloads_the_same_key() {
        let path = temp_path("gen");
        let _ = fs::remove_file(&path);
        let first = load_or_generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let second = load_or_generate(&path).unwrap();
        assert_eq!(public_key(&first), public_key(&second));
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn tightens_loose_permissions_and_rejects_garbage() {
        let path = temp_path("loose");
        load_or_generate(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        load_or_generate(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::write(&path, "AAAA\n").unwrap();
        let Err(err) = load_or_generate(&path) else {
            panic!("a 3-byte key was accepted");
        };
        assert!(
            matches!(
                err,
                Error::Invalid {
                    field: "private key",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = err.to_string();
        assert!(err.contains("3 bytes") && err.contains("key"), "{err}");
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
