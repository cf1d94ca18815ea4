//! Argument errors and the exit codes (README "Exit codes"): clap's own parse errors and every
//! [`UsageError`] (a flag or value the command cannot use, found before anything is spent) exit
//! with [`EXIT_USAGE`]; a bought job stopped by Ctrl-C with [`EXIT_INTERRUPTED`]; every other
//! failure with [`EXIT_FAILURE`]. A closed stdout (`| head -1`)
//! ends the command quietly with success: the reader has what it wanted.

use std::fmt;
use std::io::Write;

/// The process's exit status for a wrong command line: 2, as clap and most Unix tools use.
pub(crate) const EXIT_USAGE: u8 = 2;
/// Anything else that failed: the network, the ledger, the model, the disk.
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Stopped by Ctrl-C (SIGINT) midway: 128 + 2, what a shell reports for a process SIGINT
/// killed, so scripts that test for it keep working.
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

/// The command was stopped by Ctrl-C; the message says what became of the work under way.
#[derive(Debug)]
pub(crate) struct Interrupted(pub(crate) String);

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// The command line asks for something the command cannot do; the message says what is allowed.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// `usage!("...")`: an [`anyhow::Error`] holding a [`UsageError`].
macro_rules! usage {
    ($($t:tt)*) => {
        ::anyhow::Error::new($crate::usage::UsageError(format!($($t)*)))
    };
}
pub(crate) use usage;

/// The exit status for an error: [`EXIT_USAGE`] if a [`UsageError`] is anywhere in its chain.
pub(crate) fn exit_code(e: &anyhow::Error) -> u8 {
    let flag = |c: &(dyn std::error::Error + 'static)| {
        c.is::<UsageError>()
            || c.downcast_ref::<pixmarket_node::launch::LaunchError>()
                .is_some_and(pixmarket_node::launch::LaunchError::is_flag_error)
    };
    if e.chain().any(|c| c.is::<Interrupted>()) {
        EXIT_INTERRUPTED
    } else if e.chain().any(flag) {
        EXIT_USAGE
    } else {
        EXIT_FAILURE
    }
}

/// Whether the error is stdout closed under us (the reader of a pipe went away).
pub(crate) fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes one line to stdout, returning the error (a closed pipe) instead of panicking as
/// `println!` does. Use through [`out!`].
pub(crate) fn write_line(args: fmt::Arguments<'_>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    out.write_all(b"\n")
}

/// Writes without a newline (for text that ends in its own).
pub(crate) fn write_text(args: fmt::Arguments<'_>) -> std::io::Result<()> {
    std::io::stdout().lock().write_fmt(args)
}

/// `out!("...")?`: `println!` that returns a closed pipe as an error.
macro_rules! out {
    () => {
        $crate::usage::write_line(format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::usage::write_line(format_args!($($t)*))
    };
}
pub(crate) use out;

/// `out_text!("...")?`: `print!` that returns a closed pipe as an error.
macro_rules! out_text {
    ($($t:tt)*) => {
        $crate::usage::write_text(format_args!($($t)*))
    };
}
pub(crate) use out_text;
