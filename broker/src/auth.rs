//! Optional user name / password check from a file of `user:password` or
//! `user:sha256:HEX` lines (`#` starts a comment).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading password file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("password file {path} line {line}: expected user:password")]
    Syntax { path: PathBuf, line: usize },
}

enum Secret {
    Plain(Vec<u8>),
    Sha256(String),
}

pub struct Auth {
    users: HashMap<String, Secret>,
}

impl Auth {
    pub fn load(path: &Path) -> Result<Auth, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: path.into(), source })?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, secret) = line.split_once(':').ok_or(AuthError::Syntax { path: path.into(), line: i + 1 })?;
            let secret = match secret.strip_prefix("sha256:") {
                Some(hex) => Secret::Sha256(hex.to_ascii_lowercase()),
                None => Secret::Plain(secret.as_bytes().to_vec()),
            };
            users.insert(user.to_owned(), secret);
        }
        Ok(Auth { users })
    }

    pub fn check(&self, user: Option<&str>, password: Option<&[u8]>) -> bool {
        let (Some(user), Some(password)) = (user, password) else {
            return false;
        };
        match self.users.get(user) {
            Some(Secret::Plain(p)) => p == password,
            Some(Secret::Sha256(hex)) => {
                let digest = Sha256::digest(password);
                let got: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                &got == hex
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_hashed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("pw");
        // sha256("secret")
        std::fs::write(
            &p,
            "# users\nalice:pw1\nbob:sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b\n",
        )
        .expect("write");
        let a = Auth::load(&p).expect("loads");
        assert!(a.check(Some("alice"), Some(b"pw1")));
        assert!(!a.check(Some("alice"), Some(b"pw2")));
        assert!(a.check(Some("bob"), Some(b"secret")));
        assert!(!a.check(Some("bob"), Some(b"Secret")));
        assert!(!a.check(None, None));
    }
}
