//! The crate's one error type: every failure names the file, tensor or operation it concerns.

use std::path::PathBuf;

/// Every fallible operation in the crate returns this error.
///
/// Each variant carries the thing that was wrong (a file path, a tensor name, an
/// operation) so that a CLI user gets one line that says what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is malformed.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A tensor (named) has the wrong shape, dtype or values.
    #[error("tensor `{name}`: {msg}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A coordinate does not fit the packed 64-bit key used by the kernel-map builders.
    #[error("coordinate {coord:?} is outside the supported range: {msg}")]
    CoordRange {
        /// The coordinate `(b, x, y, z)`.
        coord: [i32; 4],
        /// The allowed range.
        msg: String,
    },
    /// No usable GPU adapter (the message says how to get one).
    #[error("no GPU: {0}")]
    NoGpu(String),
    /// An operation was asked for with arguments it cannot honour.
    #[error("{op}: {msg}")]
    Invalid {
        /// The operation or argument.
        op: &'static str,
        /// Why it cannot run.
        msg: String,
    },
}

/// Crate-wide result alias.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A malformed-file error.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }

    /// An I/O error on a file.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A bad-tensor error.
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { name: name.into(), msg: msg.into() }
    }

    /// An invalid-argument error.
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid { op, msg: msg.into() }
    }

    /// Prefix a file path to errors that do not carry one yet (tensor errors while reading a file).
    pub fn in_file(self, path: impl Into<PathBuf>) -> Self {
        match self {
            Error::Tensor { name, msg } => Error::Format { path: path.into(), msg: format!("tensor `{name}`: {msg}") },
            Error::Invalid { op, msg } => Error::Format { path: path.into(), msg: format!("{op}: {msg}") },
            Error::CoordRange { coord, msg } => Error::Format {
                path: path.into(),
                msg: format!("coordinate {coord:?} is outside the supported range: {msg}"),
            },
            other => other,
        }
    }
}
