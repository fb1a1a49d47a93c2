//! One error type for the host. It carries the exit code of DESIGN.md §3, so whoever returns
//! an error decides what kind of failure it is, and `main` alone prints it and exits.

/// Exit codes of DESIGN.md §3.
pub mod exit {
    pub const OK: i32 = 0;
    /// A script error, a failed host call, bad data.
    pub const ERROR: i32 = 1;
    /// A usage error: bad option, unreadable recipe, a resume that does not fit.
    pub const USAGE: i32 = 2;
    pub const PANIC: i32 = 101;
    /// The final save itself failed (disk full, no permission).
    pub const SAVE_FAILED: i32 = 74;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The user asked for something that cannot be done as asked (exit 2).
    Usage,
    /// Something failed while doing what was asked (exit 1).
    Failed,
    /// Writing a checkpoint failed (exit 74).
    SaveFailed,
    /// Training diverged (exit 1); the diverged state was already saved beside the good one.
    Diverged,
    /// A stop (Ctrl+C, SIGTERM, SIGHUP) ended the work at a boundary (exit 128 + signal).
    Interrupted,
    /// Data-parallel: another rank stopped answering (exit 1).
    PeerLost,
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn usage(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Usage,
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Failed,
            message: message.into(),
        }
    }

    pub fn diverged(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Diverged,
            message: message.into(),
        }
    }

    pub fn interrupted() -> Error {
        Error {
            kind: Kind::Interrupted,
            message: "interrupted".into(),
        }
    }

    pub fn peer_lost(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::PeerLost,
            message: message.into(),
        }
    }

    pub fn save_failed(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::SaveFailed,
            message: message.into(),
        }
    }

    /// The same error with `context: ` in front of its message.
    pub fn context(self, context: impl std::fmt::Display) -> Error {
        Error {
            kind: self.kind,
            message: format!("{context}: {}", self.message),
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self.kind {
            Kind::Usage => exit::USAGE,
            Kind::Failed | Kind::Diverged | Kind::PeerLost => exit::ERROR,
            Kind::SaveFailed => exit::SAVE_FAILED,
            Kind::Interrupted => crate::host::signals::exit_code(
                crate::host::signals::received().unwrap_or(libc::SIGINT),
            ),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Plain-text errors from lower layers are failures (exit 1) unless a caller says otherwise.
impl From<String> for Error {
    fn from(message: String) -> Error {
        Error::failed(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Error {
        Error::failed(message)
    }
}

impl From<crate::ckpt::SaveError> for Error {
    fn from(e: crate::ckpt::SaveError) -> Error {
        Error::save_failed(e.to_string())
    }
}

/// Errors reach a recipe as Lua errors. Usage errors (a resume that does not fit),
/// divergence and a lost peer keep their kind, so the guard still picks their ending and exit code.
impl From<Error> for mlua::Error {
    fn from(e: Error) -> mlua::Error {
        match e.kind {
            Kind::Interrupted => mlua::Error::external(crate::host::signals::Interrupted),
            Kind::Usage | Kind::Diverged | Kind::PeerLost => mlua::Error::external(e),
            _ => mlua::Error::runtime(e.message),
        }
    }
}

/// The host error inside a Lua error, if there is one.
pub fn find_in(e: &mlua::Error) -> Option<&Error> {
    e.chain().find_map(|c| c.downcast_ref::<Error>())
}
