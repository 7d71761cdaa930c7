//! Clips as files: what a device reads from a folder instead of a data source (a camera's
//! recordings). One safetensors file per clip: an F32 tensor `frames` shaped `[T, C, H, W]` as the
//! task says, values in [0, 1], and the question (required), caption and answer (optional: only
//! labelled clips are scored) in the metadata.

use std::path::{Path, PathBuf};

use crate::data::{Clip, TaskSpec};
use crate::tensor::HostTensor;
use crate::wire::{self, WireError};

/// Longest question or caption accepted, in bytes.
pub const MAX_TEXT: usize = 4096;

/// Why a clip file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClipFileError {
    /// The folder or a file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// A file is not a clip of this task.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The folder holds no clip file.
    #[error("{0}: no *.safetensors clip files")]
    Empty(PathBuf),
}

/// A clip's file bytes.
///
/// # Errors
/// [`WireError::Encode`] when the frames hold a non-finite value.
pub fn encode_clip(clip: &Clip, task: &TaskSpec) -> Result<Vec<u8>, WireError> {
    if !clip.frames.is_finite() {
        return Err(WireError::Encode { tensor: "frames".into(), reason: "non-finite value".into() });
    }
    let mut metadata =
        vec![("question".to_string(), clip.question.clone()), ("caption".to_string(), clip.caption.clone())];
    if let Some(answer) = clip.answer.and_then(|a| task.answers.get(a)) {
        metadata.push(("answer".to_string(), answer.clone()));
    }
    let tensors = [("frames".to_string(), clip.frames.clone())].into();
    Ok(wire::encode_f32_tensors(&tensors, metadata))
}

/// A clip from untrusted file bytes, checked against `task`: the frames' shape, values in
/// [0, 1], text lengths, and an answer from the task's vocabulary.
///
/// # Errors
/// [`WireError`] naming what is wrong.
pub fn decode_clip(bytes: &[u8], task: &TaskSpec) -> Result<Clip, WireError> {
    let meta = wire::read_metadata(bytes)?;
    let mut tensors = wire::decode_f32_tensors(bytes)?;
    let frames: HostTensor = tensors.remove("frames").ok_or_else(|| WireError::Content("no `frames` tensor".into()))?;
    let [c, h, w] = task.frame_shape;
    let expected = [task.frames_per_clip, c, h, w];
    if frames.shape() != expected {
        return Err(WireError::Content(format!(
            "frames have shape {:?}, the task's clips {expected:?}",
            frames.shape()
        )));
    }
    if frames.values().iter().any(|v| !(0.0..=1.0).contains(v)) {
        return Err(WireError::Content("frame values outside [0, 1]".into()));
    }
    let text = |key: &str| -> Result<String, WireError> {
        let value = meta.get(key).cloned().unwrap_or_default();
        if value.len() > MAX_TEXT {
            return Err(WireError::Content(format!("`{key}` of {} bytes, over {MAX_TEXT}", value.len())));
        }
        Ok(value)
    };
    let question = text("question")?;
    if question.is_empty() {
        return Err(WireError::Content("no `question` in the metadata".into()));
    }
    let answer = match meta.get("answer") {
        None => None,
        Some(a) => Some(
            task.answers
                .iter()
                .position(|x| x == a)
                .ok_or_else(|| WireError::Content(format!("answer `{a}` is not in the task's vocabulary")))?,
        ),
    };
    // A clip file says nothing trustworthy about where its frames came from.
    Ok(Clip { frames, question, caption: text("caption")?, answer, provenance: Vec::new() })
}

/// Every `*.safetensors` clip of `dir`, in file-name order.
///
/// # Errors
/// [`ClipFileError`] naming the folder or the first file refused.
pub fn read_clip_dir(dir: &Path, task: &TaskSpec) -> Result<Vec<Clip>, ClipFileError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| ClipFileError::Io { path, error }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ClipFileError::Empty(dir.to_path_buf()));
    }
    files
        .iter()
        .map(|path| {
            let bytes = crate::files::read(path, crate::wire::MAX_PAYLOAD as u64, crate::files::Links::Within(dir))
                .map_err(|e| ClipFileError::Invalid { path: path.clone(), message: e.to_string() })?;
            decode_clip(&bytes, task).map_err(|e| ClipFileError::Invalid { path: path.clone(), message: e.to_string() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskSpec {
        TaskSpec { answers: vec!["yes".into(), "no".into()], frames_per_clip: 2, frame_shape: [1, 2, 2] }
    }

    fn clip(answer: Option<usize>) -> Clip {
        Clip {
            frames: HostTensor::new(vec![2, 1, 2, 2], (0..8).map(|i| i as f32 / 8.0).collect()).expect("fits"),
            question: "is it?".into(),
            caption: "a thing".into(),
            answer,
            provenance: Vec::new(),
        }
    }

    #[test]
    fn clips_round_trip_through_files() {
        for answer in [Some(1), None] {
            let bytes = encode_clip(&clip(answer), &task()).expect("encodes");
            assert_eq!(decode_clip(&bytes, &task()).expect("decodes"), clip(answer));
        }
    }

    #[test]
    fn clips_of_another_task_are_refused_with_the_reason() {
        let bytes = encode_clip(&clip(Some(0)), &task()).expect("encodes");
        let other = TaskSpec { frames_per_clip: 3, ..task() };
        assert!(decode_clip(&bytes, &other).expect_err("refused").to_string().contains("shape"));
        let fewer = TaskSpec { answers: vec!["maybe".into()], ..task() };
        assert!(decode_clip(&bytes, &fewer).expect_err("refused").to_string().contains("vocabulary"));
        assert!(decode_clip(b"junk", &task()).is_err());
    }

    #[test]
    fn a_folder_is_read_in_name_order_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(read_clip_dir(dir.path(), &task()), Err(ClipFileError::Empty(_))));
        for (name, answer) in [("b.safetensors", None), ("a.safetensors", Some(1))] {
            std::fs::write(dir.path().join(name), encode_clip(&clip(answer), &task()).expect("encodes"))
                .expect("written");
        }
        let clips = read_clip_dir(dir.path(), &task()).expect("reads");
        assert_eq!(clips.iter().map(|c| c.answer).collect::<Vec<_>>(), [Some(1), None]);
        std::fs::write(dir.path().join("c.safetensors"), b"junk").expect("written");
        let err = read_clip_dir(dir.path(), &task()).expect_err("refused");
        assert!(err.to_string().contains("c.safetensors"), "{err}");
    }
}
