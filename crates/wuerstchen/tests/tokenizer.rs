//! The CLIP tokenizer against transformers' `CLIPTokenizer` on the real 49408-token
//! vocabulary, from both folder layouts.

mod common;

use std::io::Read;

use common::fixtures;
use wuerstchen::tokenizer::ClipTokenizer;

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    attention_mask: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("tokenizer/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(tok: &ClipTokenizer, layout: &str) {
    let cases = cases();
    assert!(cases.len() >= 20);
    assert_eq!(tok.vocab_size(), 49408, "{layout}");
    let mut long = 0;
    for c in &cases {
        let (ids, mask) = tok.encode(&c.prompt).unwrap();
        assert_eq!(ids, c.input_ids, "{layout}: ids of {:?}", c.prompt);
        assert_eq!(mask, c.attention_mask, "{layout}: mask of {:?}", c.prompt);
        if c.attention_mask.iter().all(|&m| m == 1) {
            long += 1;
        }
    }
    assert!(long >= 1, "no prompt reached the 77-token limit");
    println!(
        "{layout}: {} prompts identical to transformers",
        cases.len()
    );
}

#[test]
fn vocab_and_merges_match_transformers() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    check(&tok, "vocab.json + merges.txt");
}

#[test]
fn tokenizer_json_matches_transformers() {
    let gz = std::fs::read(fixtures().join("tokenizer/json/tokenizer.json.gz")).unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut json)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("wuerstchen-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), json).unwrap();
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    check(&tok, "tokenizer.json");
}

#[test]
fn batch_encoding_equals_single() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    let batch = tok.encode_batch(&["a red circle", ""]).unwrap();
    assert_eq!(batch.input_ids[0], tok.encode("a red circle").unwrap().0);
    // the empty prompt is [bos, eos, pad...] with mask [1, 1, 0...]
    assert_eq!(&batch.input_ids[1][..3], &[49406, 49407, 49407]);
    assert_eq!(&batch.attention_mask[1][..3], &[1, 1, 0]);
}

#[test]
fn missing_tokenizer_files_are_named() {
    let err = ClipTokenizer::from_dir(&fixtures().join("prior_a"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("vocab.json"),
        "{err}"
    );
}
