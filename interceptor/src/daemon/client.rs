//! Talking to the daemon over its control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::protocol::{Request, Response};

/// Sends one request and returns the daemon's response.
pub fn call(socket: &Path, req: &Request) -> Result<Response> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    let resp = exchange(socket, &line)?;
    serde_json::from_slice(&resp).context("decoding the daemon's response")
}

/// Sends one encoded request line and returns the answer line: the round trip of `call`
/// without the JSON (the benchmark times this part).
pub fn exchange(socket: &Path, line: &[u8]) -> Result<Vec<u8>> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the interceptor daemon at {}",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    // The daemon may answer and close before reading (it refuses non-root peers at once): a
    // failed write still leaves its answer to read.
    let wrote = s.write_all(line);
    let mut resp = Vec::new();
    let read = BufReader::new(&s).read_until(b'\n', &mut resp);
    if resp.is_empty() {
        wrote.context("sending the request to the daemon")?;
        read.context("reading the daemon's response")?;
        bail!("the daemon closed the connection without answering (not root?)");
    }
    Ok(resp)
}

/// Whether a daemon answers on `socket`.
pub fn running(socket: &Path) -> bool {
    socket.exists() && matches!(call(socket, &Request::Ping), Ok(Response::Pong))
}
