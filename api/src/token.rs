//! Who may call the API: the cookie token the node writes at each start to
//! `<data-dir>/api.token` (mode 0600, full rights, as bitcoind's `.cookie`), and named tokens
//! from `config.toml` with the scopes they were given. Presented tokens are compared in
//! constant time against every known one, so the time an answer takes says nothing about how
//! much of a token was right.

use std::io::Write;
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

/// The cookie file's name in the data folder.
pub const TOKEN_FILE: &str = "api.token";
/// The file beside it that says where the API listens (`HOST:PORT`), so the CLI finds it.
pub const ADDR_FILE: &str = "api.addr";
/// Bytes of randomness in the cookie token (hex-encoded: 64 characters); 256 bits cannot be
/// guessed.
const TOKEN_BYTES: usize = 32;
/// Named tokens shorter than this are refused: 32 characters of a random token are at least
/// 128 bits.
pub const MIN_TOKEN_CHARS: usize = 32;
/// Named tokens configured at most; each presented token is compared with every one.
pub const MAX_NAMED_TOKENS: usize = 64;

/// What a token lets its holder do. `Admin` implies the others, `Buy` implies `Read`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Status, models, jobs, receipts, balances.
    Read,
    /// Spend this node's credit: generate, submit and cancel jobs.
    Buy,
    /// Change the books: deposits, credit limits, default credit.
    Admin,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Buy => "buy",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Scope::Read),
            "buy" => Some(Scope::Buy),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// A token's rights: the scopes it was given (admin implies buy implies read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub name: String,
    pub scopes: Vec<Scope>,
}

impl Grant {
    pub fn allows(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|s| *s >= needed)
    }
}

/// Why the tokens could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot write the API token file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "config key `api_tokens` entry {name:?}: {problem} (each entry: name, a random token of at least {MIN_TOKEN_CHARS} characters, scopes from read, buy, admin)"
    )]
    Named { name: String, problem: String },
    #[error("config key `api_tokens` has {0} entries; at most {MAX_NAMED_TOKENS} are allowed")]
    TooMany(usize),
}

/// Every token the API accepts.
pub struct Tokens {
    known: Vec<(Vec<u8>, Grant)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.known.len())
            .finish()
    }
}

impl Tokens {
    /// The cookie token with full rights, and `named` (name, token, scope names) from config.
    pub fn new(cookie: &str, named: &[(String, String, Vec<String>)]) -> Result<Self, TokenError> {
        if named.len() > MAX_NAMED_TOKENS {
            return Err(TokenError::TooMany(named.len()));
        }
        let mut known = vec![(
            cookie.as_bytes().to_vec(),
            Grant {
                name: "cookie".into(),
                scopes: vec![Scope::Admin],
            },
        )];
        for (name, token, scope_names) in named {
            let problem = |p: String| TokenError::Named {
                name: name.clone(),
                problem: p,
            };
            if token.chars().count() < MIN_TOKEN_CHARS {
                return Err(problem(format!(
                    "the token has {} characters",
                    token.chars().count()
                )));
            }
            if token.chars().any(|c| !c.is_ascii_graphic()) {
                return Err(problem(
                    "the token has spaces or non-ASCII characters".into(),
                ));
            }
            if scope_names.is_empty() {
                return Err(problem("no scopes".into()));
            }
            let mut scopes = Vec::new();
            for s in scope_names {
                scopes
                    .push(Scope::parse(s).ok_or_else(|| problem(format!("unknown scope {s:?}")))?);
            }
            known.push((
                token.as_bytes().to_vec(),
                Grant {
                    name: name.clone(),
                    scopes,
                },
            ));
        }
        Ok(Self { known })
    }

    /// The grant of `presented`, comparing it with every known token in constant time (each
    /// comparison takes the same time whatever matched, and all of them always run).
    pub fn check(&self, presented: &[u8]) -> Option<&Grant> {
        let mut found = None;
        for (token, grant) in &self.known {
            // `ct_eq` on slices of different lengths is false without looking at the bytes;
            // lengths are not secret (the cookie's is fixed and public).
            if bool::from(token.as_slice().ct_eq(presented)) && found.is_none() {
                found = Some(grant);
            }
        }
        found
    }
}

/// A fresh random cookie token: 64 hex characters.
pub fn fresh_token() -> String {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    hex::encode(bytes)
}

/// Writes `contents` to `path` readable by its owner only (0600 on Unix), replacing an older
/// file through a rename so a reader never sees half a token.
pub fn write_private(path: &Path, contents: &str) -> Result<(), TokenError> {
    let err = |source| TokenError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn scopes_and_constant_time_lookup() {
        let named = vec![("gateway".to_owned(), "g".repeat(40), vec!["buy".to_owned()])];
        let t = Tokens::new("c".repeat(64).as_str(), &named).unwrap();
        assert!(
            t.check("c".repeat(64).as_bytes())
                .unwrap()
                .allows(Scope::Admin)
        );
        let g = t.check("g".repeat(40).as_bytes()).unwrap();
        assert!(g.allows(Scope::Buy) && g.allows(Scope::Read) && !g.allows(Scope::Admin));
        assert!(t.check("g".repeat(39).as_bytes()).is_none());
        assert!(t.check(b"").is_none());
    }

    #[test]
    fn short_or_unscoped_named_tokens_are_refused() {
        let short = vec![("a".to_owned(), "x".repeat(10), vec!["read".to_owned()])];
        let e = Tokens::new("c", &short).unwrap_err().to_string();
        assert!(e.contains("10 characters"), "{e}");
        let bad = vec![("a".to_owned(), "x".repeat(40), vec!["root".to_owned()])];
        let e = Tokens::new("c", &bad).unwrap_err().to_string();
        assert!(e.contains("unknown scope \"root\""), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn the_token_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(TOKEN_FILE);
        write_private(&p, "abc").unwrap();
        write_private(&p, "def").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "def");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
