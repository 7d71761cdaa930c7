//! A video file a device reads (`mmpg device --video`): any bytes through FFmpeg's demuxers and
//! decoders and mmpg-video's sampling; clips of the task's shape, or an error naming the file.
//! Seed the corpus with real files: `cp ../data/videos/*.mp4 corpus/video_file/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmpg::TaskSpec;
use mmpg_video::{Sampling, read_clips};

fuzz_target!(|bytes: &[u8]| {
    let task = TaskSpec { answers: vec!["yes".into()], frames_per_clip: 2, frame_shape: [1, 4, 4] };
    // FFmpeg reads from a path: one file per process, rewritten each run.
    let path = std::env::temp_dir().join(format!("mmpg-fuzz-video-{}", std::process::id()));
    std::fs::write(&path, bytes).expect("temp file");
    match read_clips(&path, &task, Sampling { stride: 2, max_clips: 3 }, "q") {
        Ok((clips, info)) => {
            assert!(!clips.is_empty() && clips.len() <= 3);
            assert!(clips.iter().all(|c| c.frames.shape() == [2, 1, 4, 4]));
            assert!(clips.iter().all(|c| c.frames.values().iter().all(|v| (0.0..=1.0).contains(v))));
            assert!(info.frames_decoded >= 2);
        }
        Err(e) => assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}"),
    }
});
