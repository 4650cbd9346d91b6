//! `cocalc shell`: an interactive terminal in a project, over the host's
//! WebSocket terminal. The local terminal is put in raw mode for the
//! session (and restored after), window size changes are forwarded, and
//! end of input (or the shell exiting) ends the session.

use std::io::Write;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Restores the terminal's settings when dropped.
struct RawMode {
    saved: Option<rustix::termios::Termios>,
}

impl RawMode {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(&stdin) else {
            return RawMode { saved: None }; // not a terminal: nothing to do
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                t,
            );
        }
    }
}

fn window_size() -> (u16, u16) {
    match rustix::termios::tcgetwinsize(std::io::stdout()) {
        Ok(w) if w.ws_row > 0 && w.ws_col > 0 => (w.ws_row, w.ws_col),
        _ => (24, 80),
    }
}

/// Runs a terminal session against `host_url` for `project` with `token`.
pub async fn shell(
    host_url: &str,
    project: cocalc_core::ProjectId,
    token: &str,
) -> Result<(), String> {
    let (rows, cols) = window_size();
    let url = format!(
        "{}/{project}/terminal?rows={rows}&cols={cols}",
        host_url
            .trim_end_matches('/')
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1)
    );
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "bad token".to_string())?,
    );
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| format!("terminal connection to the host: {e}"))?;
    let (mut tx, mut rx) = ws.split();
    let _raw = RawMode::enter();
    let mut stdin = tokio::io::stdin();
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let mut input_open = true;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if input_open => match n {
                Ok(0) | Err(_) => {
                    // End of input: ask the shell to exit, then wait for it.
                    input_open = false;
                    let _ = tx.send(Message::Binary(b"exit\n".to_vec().into())).await;
                }
                Ok(n) => {
                    if tx.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            },
            _ = winch.recv() => {
                let (rows, cols) = window_size();
                let msg = serde_json::json!({"resize": {"rows": rows, "cols": cols}}).to_string();
                let _ = tx.send(Message::Text(msg.into())).await;
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    Ok(())
}
