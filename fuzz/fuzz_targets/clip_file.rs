//! A clip file a device serves from a folder (`mmpg device --clips`): safetensors frames and
//! metadata, checked against the task.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmpg::TaskSpec;
use mmpg::clip_file::{decode_clip, encode_clip};

fuzz_target!(|bytes: &[u8]| {
    let task = TaskSpec { answers: vec!["yes".into(), "no".into()], frames_per_clip: 2, frame_shape: [1, 2, 2] };
    if let Ok(clip) = decode_clip(bytes, &task) {
        // What decodes is a clip of this task, and re-encodes to a file that decodes the same.
        assert_eq!(clip.frames.shape(), [2, 1, 2, 2]);
        assert!(clip.answer.is_none_or(|a| a < 2));
        let again = encode_clip(&clip, &task).expect("a decoded clip encodes");
        assert_eq!(decode_clip(&again, &task).expect("re-encoded clip decodes"), clip);
    }
});
