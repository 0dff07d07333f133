//! The web page in a real browser: headless Chromium (driven through chromedriver's
//! WebDriver HTTP API) types a prompt and a size, clicks Generate, waits for the image
//! and checks it decodes to the size asked for.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them and sets
//! WUERSTCHEN_BROWSER_TEST=1, which makes their absence a failure); elsewhere the test
//! says it was skipped.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{scratch, spawn_server};
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<Value> {
    let body = body.map(Value::to_string).unwrap_or_default();
    Ok(common::http(port, method, path, &[], &body)?.1)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn find_driver() -> Option<String> {
    let candidates = [
        std::env::var("CHROMEDRIVER").unwrap_or_default(),
        "/usr/bin/chromedriver".into(),
    ];
    candidates
        .into_iter()
        .find(|p| !p.is_empty() && std::path::Path::new(p).exists())
}

#[test]
fn the_page_generates_an_image_in_a_browser() {
    let Some(driver) = find_driver() else {
        assert!(
            std::env::var("WUERSTCHEN_BROWSER_TEST").is_err(),
            "WUERSTCHEN_BROWSER_TEST is set but chromedriver is missing (apt-get install chromium chromium-driver)"
        );
        println!("skipped: no chromedriver (apt-get install chromium chromium-driver)");
        return;
    };
    // the server, on the tiny fixture model
    let (server, port) = spawn_server(&[]);
    let _server = Killed(server);

    let wd_port = free_port();
    let _driver = Killed(
        Command::new(driver)
            .arg(format!("--port={wd_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(wd_port, "GET", "/status", None)
        .map(|s| s["value"]["ready"] != true)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let profile = scratch("chromium-profile");
    let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
        "goog:chromeOptions": {"binary": std::env::var("CHROMIUM").unwrap_or("/usr/bin/chromium".into()),
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     format!("--user-data-dir={}", profile.display())]}}}});
    let session = request(wd_port, "POST", "/session", Some(&caps)).unwrap();
    let sid = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("{session}"))
        .to_string();
    let wd = |method: &str, path: &str, body: Option<Value>| -> Value {
        request(
            wd_port,
            method,
            &format!("/session/{sid}{path}"),
            body.as_ref(),
        )
        .unwrap()["value"]
            .clone()
    };
    let find = |css: &str| -> Option<String> {
        let v = wd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT].as_str().map(String::from)
    };
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wd(
        "POST",
        "/url",
        Some(json!({"url": format!("http://127.0.0.1:{port}/")})),
    );
    // the page fills its defaults from /openapi.json: wait for them, then type over them
    let width = find("#width").expect("a width field");
    wait_for("the defaults", &|| {
        wd("GET", &format!("/element/{width}/property/value"), None) == "1024"
    });
    let type_into = |css: &str, text: &str| {
        let el = find(css).unwrap_or_else(|| panic!("no {css} on the page"));
        wd("POST", &format!("/element/{el}/clear"), Some(json!({})));
        wd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({"text": text})),
        );
    };
    type_into("#prompt", "a green square on a red background");
    type_into("#width", "256");
    type_into("#height", "128");
    type_into("#prior_num_inference_steps", "3");
    type_into("#decoder_num_inference_steps", "2");
    type_into("#seed", "11");
    let button = find("#generate").unwrap();
    wd("POST", &format!("/element/{button}/click"), Some(json!({})));
    wait_for("the image", &|| find("#images img").is_some());
    let img = find("#images img").unwrap();
    let src = wd("GET", &format!("/element/{img}/attribute/src"), None);
    let b64 = src
        .as_str()
        .and_then(|s| s.strip_prefix("data:image/png;base64,"))
        .expect("a PNG data URL");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let file = profile.join("from-the-page.png");
    std::fs::write(&file, bytes).unwrap();
    let png = wuerstchen::image_io::read_png(&file).unwrap();
    assert_eq!((png.image.width, png.image.height), (256, 128));
    let text = wuerstchen::image_io::read_parameters(&file)
        .unwrap()
        .unwrap();
    assert!(
        text.starts_with("a green square on a red background\n") && text.contains("Seed: 11"),
        "{text}"
    );
    // the parameters block and the download link are shown
    let pre = find("#images pre").unwrap();
    let shown = wd("GET", &format!("/element/{pre}/text"), None);
    assert!(shown.as_str().unwrap().contains("\"seed\": 11"), "{shown}");
    assert!(find("#images a[download]").is_some());
    wd("DELETE", "", None);
    std::fs::remove_dir_all(profile).ok();
}
