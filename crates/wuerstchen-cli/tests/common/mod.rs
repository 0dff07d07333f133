//! Helpers shared by the binary's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// `tests/fixtures` at the repository root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// An empty scratch folder, unique to this test process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wuerstchen-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a folder tree (following links, e.g. a fixture's tokenizer link).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let target = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &target);
        } else {
            std::fs::copy(&p, &target).unwrap();
        }
    }
}

/// The `wuerstchen` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wuerstchen"))
}

/// Runs `cmd`, which must succeed (its stderr is the failure message); its stdout.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert_succeeded(&out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A run that must have succeeded; its stderr is the failure message.
pub fn assert_succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `wuerstchen serve --port 0` on the fixture pipelines (plus `extra` flags);
/// returns the child and the port it announced ("listening on http://127.0.0.1:PORT").
/// Its stderr keeps being drained so it never blocks on a full pipe.
pub fn spawn_server(extra: &[&str]) -> (std::process::Child, u16) {
    use std::io::BufRead;
    let p = fixtures().join("pipeline");
    let mut child = bin()
        .args(["serve", "--port", "0", "--prior"])
        .arg(p.join("prior"))
        .arg("--decoder")
        .arg(p.join("decoder"))
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    std::thread::spawn(move || for _ in lines {});
    (child, port)
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; the status and the body as JSON (or as a
/// string when it is not JSON). Reads exactly Content-Length bytes, so it works with
/// servers that keep the connection open.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, serde_json::Value)> {
    use std::io::{BufRead, Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    s.write_all(format!("{head}\r\n{body}").as_bytes())?;
    let mut reader = std::io::BufReader::new(s);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut raw = vec![0; len];
    reader.read_exact(&mut raw)?;
    let value = serde_json::from_slice(&raw)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&raw).into_owned()));
    Ok((status, value))
}
