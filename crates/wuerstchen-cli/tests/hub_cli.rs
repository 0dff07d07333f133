//! Hub ids downloaded (the `hub` feature, on by default): `generate` against a hub
//! of our own on loopback that speaks the Hugging Face API the way huggingface.co
//! does (`/api/models/{repo}/revision/main`; `/{repo}/resolve/main/{file}` with
//! ranges, `etag` and `x-repo-commit`, and for weights a redirect to a CDN path with
//! `x-linked-etag`), serving the fixture pipelines.
#![cfg(feature = "hub")]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};

use common::{assert_succeeded, bin, fixtures, scratch};
use wuerstchen::image_io::read_png;

const SHA: &str = "5f1e0c0ffee5f1e0c0ffee5f1e0c0ffee5f1e0c0";

/// Files a repository lists beside the pipeline's that a download must leave alone:
/// variants and other formats of the weights, and files outside its folders.
const NOT_NEEDED: [&str; 4] = [
    "README.md",
    "prior/diffusion_pytorch_model.fp16.safetensors",
    "decoder/diffusion_pytorch_model.bin",
    "text_encoder/model.fp16.safetensors",
];

/// A repository: its files by path, bytes read from a fixture folder.
type Repo = BTreeMap<String, Vec<u8>>;

fn repo_from(dir: &Path) -> Repo {
    fn walk(root: &Path, dir: &Path, files: &mut Repo) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            // metadata follows links (the fixtures' tokenizer folders are links)
            if std::fs::metadata(&p).unwrap().is_dir() {
                walk(root, &p, files);
            } else {
                let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                files.insert(name, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut files = Repo::new();
    walk(dir, dir, &mut files);
    for extra in NOT_NEEDED {
        files.insert(extra.into(), b"never to be fetched".to_vec());
    }
    files
}

/// The hub: repositories by id, and the path of every request it answered.
struct Hub {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    /// The revision every repository is at.
    commit: Arc<Mutex<String>>,
}

impl Hub {
    fn start(repos: BTreeMap<String, Repo>) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let commit = Arc::new(Mutex::new(SHA.to_string()));
        let (seen, at) = (requests.clone(), commit.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let sha = at.lock().unwrap().clone();
                answer(stream, port, &sha, &repos, &seen);
            }
        });
        Hub {
            port,
            requests,
            commit,
        }
    }

    /// A new revision of every repository, with the same files.
    fn commit(&self, sha: &str) {
        *self.commit.lock().unwrap() = sha.to_string();
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The files downloaded so far (whole-file requests; the size probes ask for
    /// byte 0 only), and forgets all requests.
    fn take_downloads(&self) -> Vec<String> {
        let mut seen = self.requests.lock().unwrap();
        let files = seen
            .iter()
            .filter_map(|r| r.strip_suffix(" bytes=0-"))
            .map(String::from)
            .collect();
        seen.clear();
        files
    }
}

/// One HTTP/1.1 exchange, then the connection is closed.
fn answer(
    stream: TcpStream,
    port: u16,
    sha: &str,
    repos: &BTreeMap<String, Repo>,
    seen: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let target = line.split_whitespace().nth(1).unwrap_or("");
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap() == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().strip_prefix("bytes=").map(String::from);
            }
        }
    }
    let found = |id: &str| repos.get(id);
    let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if let Some(id) = path
        .strip_prefix("/api/models/")
        .and_then(|p| p.strip_suffix("/revision/main"))
    {
        seen.lock().unwrap().push(format!("list {id}"));
        match found(id) {
            Some(files) => {
                // with `?blobs=true`, weights carry their LFS id (the etag below)
                let siblings: Vec<_> = files
                    .iter()
                    .map(|(f, bytes)| match f.ends_with(".safetensors") {
                        true => serde_json::json!({
                            "rfilename": f,
                            "lfs": { "sha256": format!("{:016x}", fnv(bytes)), "size": bytes.len() },
                        }),
                        false => serde_json::json!({ "rfilename": f }),
                    })
                    .collect();
                let info = serde_json::json!({ "id": id, "sha": sha, "siblings": siblings });
                ("200 OK", vec![], info.to_string().into_bytes())
            }
            None => (
                "404 Not Found",
                vec![],
                b"{\"error\":\"Repository not found\"}".to_vec(),
            ),
        }
    } else if let Some((id, file)) = path.split_once("/resolve/main/") {
        let id = id.trim_start_matches('/');
        match found(id).and_then(|files| files.get(file)) {
            // weights live in LFS: the hub answers with its metadata and a redirect
            // to a CDN host, as huggingface.co does
            Some(bytes) if file.ends_with(".safetensors") => {
                let headers = vec![
                    format!("location: http://127.0.0.1:{port}/cdn/{id}/{file}"),
                    format!("x-linked-etag: \"{:016x}\"", fnv(bytes)),
                    format!("x-repo-commit: {sha}"),
                ];
                ("302 Found", headers, vec![])
            }
            Some(bytes) => {
                seen.lock().unwrap().push(format!(
                    "{id}/{file} bytes={}",
                    range.clone().unwrap_or_default()
                ));
                let (status, mut headers, body) = ranged(bytes, range.as_deref());
                headers.push(format!("etag: \"{:016x}\"", fnv(bytes)));
                headers.push(format!("x-repo-commit: {sha}"));
                (status, headers, body)
            }
            None => ("404 Not Found", vec![], b"Entry not found".to_vec()),
        }
    } else if let Some((id, file)) = path.strip_prefix("/cdn/").and_then(|p| {
        p.split_once('/').and_then(|(org, rest)| {
            rest.split_once('/')
                .map(|(name, file)| (format!("{org}/{name}"), file))
        })
    }) {
        match found(&id).and_then(|files| files.get(file)) {
            Some(bytes) => {
                seen.lock().unwrap().push(format!(
                    "{id}/{file} bytes={}",
                    range.clone().unwrap_or_default()
                ));
                ranged(bytes, range.as_deref())
            }
            None => ("404 Not Found", vec![], vec![]),
        }
    } else {
        ("404 Not Found", vec![], vec![])
    };
    let mut out = stream;
    let mut head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(&h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let _ = out
        .write_all(head.as_bytes())
        .and_then(|_| out.write_all(&body));
}

/// The bytes a `Range: bytes=START-[END]` asks for (all without one), as 206.
fn ranged(bytes: &[u8], range: Option<&str>) -> (&'static str, Vec<String>, Vec<u8>) {
    let mut ends = range.unwrap_or("0-").split('-');
    let start: usize = ends.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let end = match ends.next() {
        Some(e) if !e.is_empty() => e.parse::<usize>().unwrap() + 1,
        _ => bytes.len(),
    };
    let header = format!("content-range: bytes {start}-{}/{}", end - 1, bytes.len());
    (
        "206 Partial Content",
        vec![header],
        bytes[start..end].to_vec(),
    )
}

/// FNV-1a, for etags that differ with the content (the cache names blobs by them).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// `generate` at the fixtures' cheapest settings from the given prior / decoder.
fn generate(endpoint: &str, cache: &Path, prior: &str, decoder: &str, out: &Path) -> Output {
    bin()
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .args([
            "generate",
            "a red circle",
            "--quiet",
            "--seed",
            "5",
            "--out",
        ])
        .arg(out)
        .args(["--width", "128", "--height", "128"])
        .args(["--prior-steps", "1", "--decoder-steps", "1"])
        .args(["--prior", prior, "--decoder", decoder])
        .output()
        .unwrap()
}

fn pixels(png: &Path) -> Vec<u8> {
    read_png(png).unwrap().image.data
}

#[test]
fn hub_ids_are_downloaded_into_the_cache_and_read_from_it_offline() {
    let dir = scratch("hub");
    let cache = dir.join("cache");
    let pipeline = fixtures().join("pipeline");
    let repos: BTreeMap<String, Repo> = [
        ("test-org/tiny-prior", "prior"),
        ("test-org/tiny-decoder", "decoder"),
    ]
    .into_iter()
    .map(|(id, part)| (id.to_string(), repo_from(&pipeline.join(part))))
    .collect();
    let hub = Hub::start(repos.clone());
    let (prior, decoder) = ("test-org/tiny-prior", "test-org/tiny-decoder");

    // the same image as from the folders themselves
    let local = dir.join("local.png");
    let res = generate(
        &hub.endpoint(),
        &cache,
        &pipeline.join("prior").display().to_string(),
        &pipeline.join("decoder").display().to_string(),
        &local,
    );
    assert_succeeded(&res);
    assert!(hub.take_downloads().is_empty());
    let out = dir.join("hub.png");
    assert_succeeded(&generate(&hub.endpoint(), &cache, prior, decoder, &out));
    assert_eq!(pixels(&out), pixels(&local));
    let text = wuerstchen::image_io::read_parameters(&out)
        .unwrap()
        .unwrap();
    assert!(text.contains("Model: test-org/tiny-prior"), "{text}");

    // every file of the pipelines once (those directly in their folders), nothing
    // else; in huggingface_hub's layout
    let mut downloaded = hub.take_downloads();
    downloaded.sort();
    let mut expected: Vec<String> = repos
        .iter()
        .flat_map(|(id, files)| {
            files
                .keys()
                .filter(|f| f.matches('/').count() <= 1 && !NOT_NEEDED.contains(&f.as_str()))
                .map(move |f| format!("{id}/{f}"))
        })
        .collect();
    expected.sort();
    assert_eq!(downloaded, expected);
    let root = cache.join("models--test-org--tiny-prior");
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        SHA
    );
    let config = root.join(format!("snapshots/{SHA}/prior/config.json"));
    assert_eq!(
        std::fs::read(&config).unwrap(),
        repos[prior]["prior/config.json"]
    );

    // again: the file list is asked for, no file fetched again
    assert_succeeded(&generate(&hub.endpoint(), &cache, prior, decoder, &out));
    assert!(hub.take_downloads().is_empty());
    // a snapshot cut off half-way: only the missing file is fetched
    std::fs::remove_file(&config).unwrap();
    assert_succeeded(&generate(&hub.endpoint(), &cache, prior, decoder, &out));
    assert_eq!(hub.take_downloads(), [format!("{prior}/prior/config.json")]);
    // a new revision with the same weights (a README edit): the small files are
    // fetched for it, the weights linked to the blobs already cached
    let next = "0000000000000000000000000000000000000002";
    hub.commit(next);
    assert_succeeded(&generate(&hub.endpoint(), &cache, prior, decoder, &out));
    let fetched = hub.take_downloads();
    assert!(!fetched.is_empty());
    assert!(
        fetched.iter().all(|f| !f.ends_with(".safetensors")),
        "{fetched:?}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        next
    );
    let weights = root.join(format!(
        "snapshots/{next}/prior/diffusion_pytorch_model.safetensors"
    ));
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        repos[prior]["prior/diffusion_pytorch_model.safetensors"]
    );
    assert_eq!(pixels(&out), pixels(&local));

    // no hub to reach: the cached snapshot, saying why
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let res = generate(&nowhere, &cache, prior, decoder, &out);
    assert_succeeded(&res);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("using the cached snapshot"), "{stderr}");
    assert_eq!(pixels(&out), pixels(&local));

    // a repository the hub does not have: the error names it, the hub and the cache
    let missing = dir.join("missing.png");
    let res = generate(
        &hub.endpoint(),
        &cache,
        "test-org/nothing",
        decoder,
        &missing,
    );
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    for part in [
        "test-org/nothing",
        &hub.endpoint(),
        "404",
        "HF_TOKEN",
        &cache.display().to_string(),
        "pass --prior DIR",
    ] {
        assert!(stderr.contains(part), "{part:?} not in {stderr}");
    }
    assert!(!missing.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_repository_without_the_pipeline_folder_is_refused_before_downloading() {
    let dir = scratch("hub-wrong");
    let pipeline = fixtures().join("pipeline");
    // the decoder repository given as the prior
    let repos = BTreeMap::from([(
        "test-org/tiny-decoder".to_string(),
        repo_from(&pipeline.join("decoder")),
    )]);
    let hub = Hub::start(repos);
    let out = dir.join("out.png");
    let res = generate(
        &hub.endpoint(),
        &dir.join("cache"),
        "test-org/tiny-decoder",
        "test-org/tiny-decoder",
        &out,
    );
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("has no prior/config.json"), "{stderr}");
    let got = hub.take_downloads();
    assert!(got.is_empty(), "{got:?} {stderr}");
    assert!(!out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}
