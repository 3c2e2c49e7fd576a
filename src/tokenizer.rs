//! The model's tokenizer (`tokenizer.json`) and its special tokens, read the way HF
//! transformers reads a model folder.
//!
//! EOS ids are gathered from every place HF keeps them: `generation_config.json` (else
//! `config.json`) and the `eos_token` of `tokenizer_config.json`. Generation stops at any of them.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    bos_id: Option<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
    clean_up_spaces: bool,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and the special tokens of a model folder.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        crate::config::check_model_folder(dir)?;
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            bail!("missing tokenizer file {}", path.display());
        }
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("invalid tokenizer file {}", path.display()))?;
        // transformers switches off the truncation and padding stored in tokenizer.json unless a
        // call asks for them; a stored `max_length` would otherwise cut prompts silently.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;

        let tok_config = JsonFile::read(dir, "tokenizer_config.json")?;
        let gen_config = JsonFile::read(dir, "generation_config.json")?;
        let model_config = JsonFile::read(dir, "config.json")?;
        let bos_token = tok_config.token("bos_token")?;
        let eos_token = tok_config.token("eos_token")?;
        let pad_token = tok_config.token("pad_token")?;
        let id_of = |token: &Option<String>| token.as_deref().and_then(|t| inner.token_to_id(t));

        // generation_config.json wins over config.json, as in `model.generate`; with the file
        // the ids came from
        let config_ids = |key: &str| -> Result<Option<(Vec<u32>, &JsonFile)>> {
            match gen_config.ids(key)? {
                Some(ids) => Ok(Some((ids, &gen_config))),
                None => Ok(model_config.ids(key)?.map(|ids| (ids, &model_config))),
            }
        };
        let mut eos_ids = Vec::new();
        if let Some((ids, file)) = config_ids("eos_token_id")? {
            // an EOS the model cannot sample would let every completion run to its cap unnoticed
            let vocab =
                (model_config.get("vocab_size").and_then(Value::as_u64)).unwrap_or(u64::MAX);
            if let Some(id) = ids.iter().find(|&&id| id as u64 >= vocab) {
                bail!(file.at(
                    "eos_token_id",
                    format!("{id} is outside the model's vocabulary of {vocab} tokens")
                ));
            }
            eos_ids = ids;
        }
        eos_ids.extend(id_of(&eos_token));
        let mut seen = Vec::new();
        eos_ids.retain(|id| {
            if seen.contains(id) {
                return false;
            }
            seen.push(*id);
            true
        });
        let pad_id = match config_ids("pad_token_id")? {
            Some((ids, _)) if !ids.is_empty() => Some(ids[0]),
            _ => id_of(&pad_token),
        };
        // BOS is the tokenizer's own (HF `tokenizer.bos_token_id`): config.json often names a
        // bos_token_id (e.g. Qwen2) that the model never gets prepended.
        let bos_id = id_of(&bos_token);

        let chat_template = chat_template(dir, &tok_config)?;
        let clean_up_spaces = match tok_config.get("clean_up_tokenization_spaces") {
            None => false,
            Some(v) => v.as_bool().with_context(|| {
                tok_config.at("clean_up_tokenization_spaces", "expected true or false")
            })?,
        };
        Ok(Tokenizer {
            inner,
            dir: dir.to_path_buf(),
            eos_ids,
            pad_id,
            bos_id,
            bos_token,
            eos_token,
            chat_template,
            clean_up_spaces,
        })
    }

    /// Token ids of `text`, without adding BOS/EOS (HF `add_special_tokens=False`); special-token
    /// strings inside the text still map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, with `clean_up_tokenization_spaces` applied when tokenizer_config.json
    /// asks for it (as HF `decode` does).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Every id that ends generation, deduplicated, the configs' ids first.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The model's Jinja chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The folder the tokenizer was loaded from.
    pub fn model_dir(&self) -> &Path {
        &self.dir
    }
}

/// An optional JSON file of the model folder (`Null` when absent), with its path for errors.
struct JsonFile {
    path: PathBuf,
    value: Value,
}

impl JsonFile {
    fn read(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        if !path.is_file() {
            return Ok(JsonFile {
                path,
                value: Value::Null,
            });
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        if !value.is_object() {
            bail!("{} must hold a JSON object", path.display());
        }
        Ok(JsonFile { path, value })
    }

    /// The value of `key`, treating `null` as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn at(&self, key: &str, problem: impl std::fmt::Display) -> String {
        format!("{}: key `{key}`: {problem}", self.path.display())
    }

    /// A special token given as a string or as `{"content": "..."}`.
    fn token(&self, key: &str) -> Result<Option<String>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v
            .as_str()
            .or_else(|| v.get("content").and_then(Value::as_str))
        {
            Some(s) => Ok(Some(s.to_string())),
            None => bail!(self.at(
                key,
                format!("expected a string or {{\"content\": string}}, got {v}")
            )),
        }
    }

    /// A token id field: an int or a list of ints.
    fn ids(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let id = |x: &Value| x.as_u64().and_then(|i| u32::try_from(i).ok());
        let ids = match v {
            Value::Array(list) => list.iter().map(id).collect(),
            one => id(one).map(|i| vec![i]),
        };
        ids.map(Some).with_context(|| {
            self.at(
                key,
                format!("expected a token id (non-negative integer) or a list of them, got {v}"),
            )
        })
    }
}

/// The chat template as transformers finds it: the file `chat_template.jinja` (which takes
/// priority), else `chat_template` of tokenizer_config.json, a string or a list of named
/// templates of which "default" is taken.
fn chat_template(dir: &Path, tok_config: &JsonFile) -> Result<Option<String>> {
    let file = dir.join("chat_template.jinja");
    if file.is_file() {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        return Ok(Some(text));
    }
    let key = "chat_template";
    match tok_config.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let default = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str);
            default
                .map(|t| Some(t.to_string()))
                .with_context(|| tok_config.at(key, "no template named \"default\""))
        }
        Some(other) => {
            bail!(tok_config.at(key, format!("expected a string or a list, got {other}")))
        }
    }
}

/// transformers' `clean_up_tokenization`: drops the space before punctuation and contractions.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A word-level tokenizer.json with two added special tokens, a BOS-adding post-processor
    /// and a stored truncation, so the tests see whether encode adds tokens or truncates.
    const TOKENIZER_JSON: &str = r#"{
      "version": "1.0",
      "truncation": {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0},
      "padding": null,
      "added_tokens": [
        {"id": 5, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 6, "content": "<|end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
      ],
      "normalizer": null,
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [5], "tokens": ["<s>"]}}
      },
      "decoder": null,
      "model": {
        "type": "WordLevel",
        "vocab": {"<unk>": 0, "hello": 1, "world": 2, "it": 3, "'s": 4},
        "unk_token": "<unk>"
      }
    }"#;

    /// A model folder with the tokenizer and the given `(file name, contents)` pairs.
    pub(crate) fn model_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), TOKENIZER_JSON).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn load(files: &[(&str, &str)]) -> Result<Tokenizer> {
        Tokenizer::from_model_dir(model_dir(files).path())
    }

    fn load_err(files: &[(&str, &str)]) -> String {
        format!("{:#}", load(files).err().expect("loading should fail"))
    }

    #[test]
    fn encodes_without_special_tokens_or_truncation_but_finds_special_strings() {
        let tok = load(&[]).unwrap();
        assert_eq!(
            tok.encode("hello world<|end|> hello world").unwrap(),
            [1, 2, 6, 1, 2]
        );
        assert_eq!(tok.decode(&[1, 6, 2], true).unwrap(), "hello world");
        assert_eq!(
            tok.decode(&[1, 6, 2], false).unwrap(),
            "hello <|end|> world"
        );
        assert_eq!(tok.vocab_size(), 7);
        assert_eq!(tok.token_to_id("<|end|>"), Some(6));
        assert_eq!(tok.token_to_id("absent"), None);
        assert!(tok.eos_token_ids().is_empty());
        assert_eq!(tok.chat_template(), None);
    }

    #[test]
    fn decode_cleans_up_spaces_only_when_configured() {
        let tok = load(&[]).unwrap();
        assert_eq!(tok.decode(&[3, 4], false).unwrap(), "it 's");
        let tok = load(&[(
            "tokenizer_config.json",
            r#"{"clean_up_tokenization_spaces": true}"#,
        )])
        .unwrap();
        assert_eq!(tok.decode(&[3, 4], false).unwrap(), "it's");
    }

    #[test]
    fn special_tokens_come_as_strings_or_objects() {
        let tok = load(&[(
            "tokenizer_config.json",
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "<|end|>",
                "pad_token": null, "chat_template": "{{ bos_token }}"}"#,
        )])
        .unwrap();
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert_eq!(tok.bos_token_id(), Some(5));
        assert_eq!(tok.eos_token(), Some("<|end|>"));
        assert_eq!(tok.eos_token_ids(), [6]);
        assert_eq!(tok.pad_token_id(), None);
        assert_eq!(tok.chat_template(), Some("{{ bos_token }}"));
    }

    #[test]
    fn eos_ids_come_from_generation_config_else_config_plus_the_eos_token() {
        let tok_config = ("tokenizer_config.json", r#"{"eos_token": "<|end|>"}"#);
        let gen = ("generation_config.json", r#"{"eos_token_id": [2, 6, 2]}"#);
        let config = ("config.json", r#"{"eos_token_id": 4, "pad_token_id": 3}"#);
        let tok = load(&[tok_config, gen, config]).unwrap();
        assert_eq!(tok.eos_token_ids(), [2, 6]);
        assert_eq!(tok.pad_token_id(), Some(3));

        let tok = load(&[tok_config, config]).unwrap();
        assert_eq!(tok.eos_token_ids(), [4, 6]);

        // A null in generation_config.json defers to config.json.
        let gen_null = ("generation_config.json", r#"{"eos_token_id": null}"#);
        assert_eq!(load(&[gen_null, config]).unwrap().eos_token_ids(), [4]);

        let tok = load(&[("generation_config.json", r#"{"eos_token_id": 1}"#)]).unwrap();
        assert_eq!(tok.eos_token_ids(), [1]);
    }

    #[test]
    fn pad_id_falls_back_to_the_pad_token() {
        let tok = load(&[("tokenizer_config.json", r#"{"pad_token": "<|end|>"}"#)]).unwrap();
        assert_eq!(tok.pad_token_id(), Some(6));
        let tok = load(&[
            ("tokenizer_config.json", r#"{"pad_token": "<|end|>"}"#),
            ("generation_config.json", r#"{"pad_token_id": 0}"#),
        ])
        .unwrap();
        assert_eq!(tok.pad_token_id(), Some(0));
    }

    #[test]
    fn bad_token_ids_name_the_file_and_key() {
        for bad in [r#""x""#, "-1", "1.5", "[1, \"x\"]", "4294967296"] {
            let gen = format!(r#"{{"eos_token_id": {bad}}}"#);
            let err = load_err(&[("generation_config.json", &gen)]);
            assert!(
                err.contains("generation_config.json") && err.contains("eos_token_id"),
                "{err}"
            );
        }
        let err = load_err(&[("config.json", r#"{"pad_token_id": true}"#)]);
        assert!(
            err.contains("config.json") && err.contains("pad_token_id"),
            "{err}"
        );
        let err = load_err(&[("tokenizer_config.json", r#"{"eos_token": 7}"#)]);
        assert!(
            err.contains("tokenizer_config.json") && err.contains("eos_token"),
            "{err}"
        );
        // an EOS the model cannot sample, named with the file it came from
        let config = ("config.json", r#"{"vocab_size": 8, "eos_token_id": 9}"#);
        let err = load_err(&[config]);
        assert!(
            err.contains("config.json") && err.contains("9 is outside the model's vocabulary of 8"),
            "{err}"
        );
        let err = load_err(&[
            config,
            ("generation_config.json", r#"{"eos_token_id": [1, 8]}"#),
        ]);
        assert!(
            err.contains("generation_config.json") && err.contains("8 is outside"),
            "{err}"
        );
        let gen = ("generation_config.json", r#"{"eos_token_id": 7}"#);
        assert_eq!(load(&[config, gen]).unwrap().eos_token_ids(), [7]);
    }

    #[test]
    fn missing_or_corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", Tokenizer::from_model_dir(dir.path()).err().unwrap());
        let want = dir.path().join("tokenizer.json");
        assert!(
            err.contains(&format!("missing tokenizer file {}", want.display())),
            "{err}"
        );

        std::fs::write(&want, "{ not json").unwrap();
        let err = format!("{:#}", Tokenizer::from_model_dir(dir.path()).err().unwrap());
        assert!(err.contains("invalid tokenizer file") && err.contains("tokenizer.json"));
        std::fs::write(&want, r#"{"model": {"type": "Nope"}}"#).unwrap();
        assert!(Tokenizer::from_model_dir(dir.path()).is_err());

        let err = load_err(&[("tokenizer_config.json", "{,}")]);
        assert!(err.contains("tokenizer_config.json"), "{err}");
        let err = load_err(&[("config.json", "[1]")]);
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn chat_template_sources() {
        let listed = r#"{"chat_template": [{"name": "tool_use", "template": "T"},
                                           {"name": "default", "template": "D"}]}"#;
        let tok = load(&[("tokenizer_config.json", listed)]).unwrap();
        assert_eq!(tok.chat_template(), Some("D"));

        let no_default = r#"{"chat_template": [{"name": "tool_use", "template": "T"}]}"#;
        let err = load_err(&[("tokenizer_config.json", no_default)]);
        assert!(
            err.contains("chat_template") && err.contains("default"),
            "{err}"
        );

        // The .jinja file takes priority, as in transformers.
        let tok = load(&[
            ("tokenizer_config.json", r#"{"chat_template": "C"}"#),
            ("chat_template.jinja", "J"),
        ])
        .unwrap();
        assert_eq!(tok.chat_template(), Some("J"));
    }
}
