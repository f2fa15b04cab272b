//! Reading a secret (a master-key share) from the terminal without echoing
//! it, or from standard input when that is not a terminal.

use std::io::{BufRead, Write};

use zeroize::Zeroizing;

/// One line from standard input, without its line ending. On a terminal,
/// `prompt` is shown on standard error and what is typed is not echoed.
///
/// # Errors
/// Standard input cannot be read, or gives nothing.
pub(super) fn read_secret_line(prompt: &str) -> Result<Zeroizing<String>, String> {
    let mut line = Zeroizing::new(String::new());
    {
        let _quiet = if is_terminal() {
            eprint!("{prompt}");
            let _ = std::io::stderr().flush();
            EchoOff::new()
        } else {
            None
        };
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
    }
    let trimmed = Zeroizing::new(line.trim().to_owned());
    if trimmed.is_empty() {
        return Err("no share was given".to_owned());
    }
    Ok(trimmed)
}

fn is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdin())
}

/// The terminal's echo turned off, and back on when dropped (also when the
/// read fails).
struct EchoOff(libc::termios);

impl EchoOff {
    #[allow(unsafe_code)]
    fn new() -> Option<Self> {
        // SAFETY: tcgetattr writes a termios for fd 0 into memory we own
        // (zero-initialised, a valid bit pattern for this plain C struct);
        // tcsetattr only reads it.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &raw mut saved) != 0 {
                return None;
            }
            let mut quiet = saved;
            // The Enter key still moves to the next line (ECHONL).
            quiet.c_lflag &= !libc::ECHO;
            quiet.c_lflag |= libc::ECHONL;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw const quiet) != 0 {
                return None;
            }
            Some(Self(saved))
        }
    }
}

impl Drop for EchoOff {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `new` on the same fd.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw const self.0);
        }
    }
}
