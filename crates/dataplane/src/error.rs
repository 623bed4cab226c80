//! The one error type of this crate: every edge (netlink, nf_tables, WireGuard, namespaces,
//! sysctl, ICMP) and every fake reports what went wrong as an [`Error`] whose kind a caller
//! can match on, and whose message names what was being done, where (which namespace,
//! device or socket) and what the kernel said.
//!
//! Messages are complete on their own: `{err}` (or `{err:#}` through `anyhow`) prints the
//! action, the scope and the kernel's errno text. The underlying [`io::Error`]s are kept in
//! the variants for callers that want them, not repeated as a `source()`.

use std::fmt;
use std::io;
use std::time::Duration;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong at a kernel edge.
///
/// `action` says what was being done ("adding route 10.0.0.0/24 dev wg0 proto 116"),
/// `scope` where ("netns lab-a", "current netns", a device or socket; empty when there is
/// nothing more to say).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Nothing answered within the time allowed; the request may or may not have taken
    /// effect.
    #[error("{action}{}: no answer within {after:?}", Scope(scope))]
    Timeout {
        action: String,
        scope: String,
        after: Duration,
    },

    /// The kernel (or a WireGuard device) refused the request with an errno. `errno` is
    /// positive (`libc::EEXIST`, ...); `message` is the kernel's extended-ack text, if any.
    #[error("{action}{}: {}{}", Scope(scope), Detail(message), io::Error::from_raw_os_error(*errno))]
    Kernel {
        action: String,
        scope: String,
        errno: i32,
        message: Option<String>,
    },

    /// Something the request refers to is missing: a link, a namespace, a table, a chain.
    /// `what` names it ("link wg0", "chain inet trellis/pre").
    #[error("{}", NotFoundMessage { action, what, scope })]
    NotFound {
        action: String,
        what: String,
        scope: String,
    },

    /// What was to be created is there already and may not be replaced: a namespace of
    /// that name, a route to the same destination that is not ours. [`Error::errno`] gives
    /// `EEXIST` for it.
    #[error("{action}{}: {what} already exists", Scope(scope))]
    AlreadyExists {
        action: String,
        scope: String,
        what: String,
    },

    /// A value refused before anything was sent: a name the kernel would not take, a rule
    /// that reads more than it loaded, a malformed key file. `value` is empty where it is
    /// not worth (or not safe) repeating.
    #[error("{}invalid {field}{}{}", Action(action), Value(value), Reason(reason))]
    Invalid {
        action: String,
        field: &'static str,
        value: String,
        reason: String,
    },

    /// A system call or file operation failed. `action` says which, and where.
    #[error("{action}: {error}")]
    Io { action: String, error: io::Error },

    /// Creating, opening, entering or deleting the network namespace `name` failed.
    #[error("{action}: {error}")]
    Namespace {
        name: String,
        action: String,
        error: io::Error,
    },

    /// This host or context cannot do it at all: no WireGuard kernel module, no tokio
    /// runtime to serve a connection.
    #[error("{action}: {why}")]
    Unsupported { action: String, why: String },

    /// An answer that does not make sense: malformed messages from the kernel or from a
    /// device's control socket, a dump the kernel kept interrupting.
    #[error("{action}{}: {what}", Scope(scope))]
    Protocol {
        action: String,
        scope: String,
        what: String,
    },

    /// A reconciler applied what it could, but some of its steps failed (each is in
    /// `failures`, with its own action and cause). Contrast with any other kind returned
    /// by a reconciler, which means it could not even read the current state.
    #[error("{} of the {what} failed: {}", failures.len(), failures.join("; "))]
    Partial { what: String, failures: Vec<String> },
}

impl Error {
    /// The errno behind the error, if it came from the kernel: the kernel's answer, or
    /// the OS error of a failed system call. `EEXIST` for [`Error::AlreadyExists`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            Error::AlreadyExists { .. } => Some(libc::EEXIST),
            Error::Io { error, .. } | Error::Namespace { error, .. } => error.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the errno behind the error (see [`Error::errno`]) is `errno`.
    pub fn has_errno(&self, errno: i32) -> bool {
        self.errno() == Some(errno)
    }

    /// Whether something was missing ([`Error::NotFound`]).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// Whether nothing answered in time ([`Error::Timeout`]).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    pub(crate) fn io(action: impl Into<String>, error: io::Error) -> Error {
        Error::Io {
            action: action.into(),
            error,
        }
    }

    pub(crate) fn namespace(name: &str, action: impl Into<String>, error: io::Error) -> Error {
        Error::Namespace {
            name: name.to_owned(),
            action: action.into(),
            error,
        }
    }

    pub(crate) fn invalid(
        field: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Error {
        Error::Invalid {
            action: String::new(),
            field,
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// The same error, saying what was being done when it was found, if it does not say
    /// already (only [`Error::Invalid`] and [`Error::NotFound`] are built without one).
    pub(crate) fn while_doing(mut self, doing: impl FnOnce() -> String) -> Error {
        if let Error::Invalid { action, .. } | Error::NotFound { action, .. } = &mut self
            && action.is_empty()
        {
            *action = doing();
        }
        self
    }
}

/// " in SCOPE", or nothing for an empty scope.
struct Scope<'a>(&'a str);

impl fmt::Display for Scope<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " in {}", self.0)
        }
    }
}

/// "ACTION in SCOPE: WHAT not found", or "WHAT not found in SCOPE" without an action.
struct NotFoundMessage<'a> {
    action: &'a str,
    what: &'a str,
    scope: &'a str,
}

impl fmt::Display for NotFoundMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.action.is_empty() {
            write!(f, "{} not found{}", self.what, Scope(self.scope))
        } else {
            write!(
                f,
                "{}{}: {} not found",
                self.action,
                Scope(self.scope),
                self.what
            )
        }
    }
}

/// "ACTION: ", or nothing for an empty action.
struct Action<'a>(&'a str);

impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}

/// "MESSAGE: ", or nothing.
struct Detail<'a>(&'a Option<String>);

impl fmt::Display for Detail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(message) => write!(f, "{message}: "),
            None => Ok(()),
        }
    }
}

/// ` "VALUE"`, or nothing for an empty value.
struct Value<'a>(&'a str);

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " {:?}", self.0)
        }
    }
}

/// " (REASON)", or nothing.
struct Reason<'a>(&'a str);

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " ({})", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_action_the_scope_and_the_errno() {
        let err = Error::Kernel {
            action: "adding route 10.0.0.0/24 dev wg0 proto 116".into(),
            scope: "netns lab-a".into(),
            errno: libc::EEXIST,
            message: None,
        };
        assert_eq!(
            err.to_string(),
            "adding route 10.0.0.0/24 dev wg0 proto 116 in netns lab-a: File exists (os error 17)"
        );
        assert!(err.has_errno(libc::EEXIST));

        let err = Error::Kernel {
            action: "adding rule to inet t/c".into(),
            scope: "netns x".into(),
            errno: libc::EOPNOTSUPP,
            message: Some("jump to a base chain".into()),
        };
        assert!(
            err.to_string().ends_with(
                "in netns x: jump to a base chain: Operation not supported (os error 95)"
            ),
            "{err}"
        );

        let err = Error::NotFound {
            action: "setting link wg0 up".into(),
            what: "link wg0".into(),
            scope: "netns lab-a".into(),
        };
        assert_eq!(
            err.to_string(),
            "setting link wg0 up in netns lab-a: link wg0 not found"
        );
        assert!(err.is_not_found() && err.errno().is_none());

        let err = Error::invalid("link name", "a/b", "no '/'");
        assert_eq!(err.to_string(), r#"invalid link name "a/b" (no '/')"#);
        let err = err.while_doing(|| "creating bridge a/b".into());
        assert_eq!(
            err.to_string(),
            r#"creating bridge a/b: invalid link name "a/b" (no '/')"#
        );

        let err = Error::Partial {
            what: "route changes".into(),
            failures: vec!["one".into(), "two".into()],
        };
        assert_eq!(err.to_string(), "2 of the route changes failed: one; two");
    }
}
