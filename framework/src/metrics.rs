//! Scores computed from model outputs.

use serde::{Deserialize, Serialize};

use crate::model::RetrievalEmbeddings;

/// Text → video retrieval scores over one evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetrievalMetrics {
    /// Fraction of captions whose first relevant video ranks first.
    pub r1: f64,
    /// … within the top 5.
    pub r5: f64,
    /// … within the top 10.
    pub r10: f64,
    /// Median rank of the first relevant video (1 is best).
    pub median_rank: f64,
}

/// Ranks, for every caption, the videos by cosine similarity (embeddings are L2-normalised, so
/// a dot product) and scores the rank of the first *relevant* video: one whose caption equals the
/// query's. Synthetic and templated captions repeat, so counting only the paired video would
/// punish the model for ties it cannot break. `None` when the embeddings are not `[n, e]` alike
/// or `captions` has another length.
pub fn retrieval(embeddings: &RetrievalEmbeddings, captions: &[&str]) -> Option<RetrievalMetrics> {
    let videos: Vec<&[f32]> = embeddings.video.rows()?.collect();
    let texts: Vec<&[f32]> = embeddings.text.rows()?.collect();
    let n = captions.len();
    if n == 0 || videos.len() != n || texts.len() != n || embeddings.video.shape() != embeddings.text.shape() {
        return None;
    }
    // A score that is not a number ranks below every other.
    let dot = |a: &[f32], b: &[f32]| {
        let s = a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        if s.is_nan() { f32::NEG_INFINITY } else { s }
    };
    // Ties rank pessimistically: a collapsed space, every score equal, ranks every query last
    // among the clips it cannot tell apart, not first.
    let mut ranks: Vec<usize> = texts
        .iter()
        .enumerate()
        .map(|(q, text)| {
            let scores: Vec<f32> = videos.iter().map(|v| dot(text, v)).collect();
            let best_relevant =
                (0..n).filter(|j| captions[*j] == captions[q]).map(|j| scores[j]).fold(f32::NEG_INFINITY, f32::max);
            1 + (0..n).filter(|j| captions[*j] != captions[q] && scores[*j] >= best_relevant).count()
        })
        .collect();
    ranks.sort_unstable();
    let within = |k: usize| ranks.iter().filter(|r| **r <= k).count() as f64 / n as f64;
    let median_rank = if n % 2 == 1 { ranks[n / 2] as f64 } else { (ranks[n / 2 - 1] + ranks[n / 2]) as f64 / 2.0 };
    Some(RetrievalMetrics { r1: within(1), r5: within(5), r10: within(10), median_rank })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostTensor;
    use proptest::prelude::*;

    fn embeddings(video: Vec<f32>, text: Vec<f32>, n: usize, e: usize) -> RetrievalEmbeddings {
        RetrievalEmbeddings {
            video: HostTensor::new(vec![n, e], video).expect("fits"),
            text: HostTensor::new(vec![n, e], text).expect("fits"),
        }
    }

    #[test]
    fn a_collapsed_or_broken_space_ranks_last_not_first() {
        let same = vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let m = retrieval(&embeddings(same.clone(), same, 3, 2), &["a", "b", "c"]).expect("scores");
        assert_eq!((m.r1, m.median_rank), (0.0, 3.0));
        let nan = vec![f32::NAN; 6];
        let m = retrieval(&embeddings(nan.clone(), nan, 3, 2), &["a", "b", "c"]).expect("scores");
        assert_eq!((m.r1, m.median_rank), (0.0, 3.0));
    }

    #[test]
    fn identical_spaces_rank_every_pair_first() {
        let basis = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let m = retrieval(&embeddings(basis.clone(), basis, 3, 3), &["a", "b", "c"]).expect("scores");
        assert_eq!((m.r1, m.r5, m.median_rank), (1.0, 1.0, 1.0));
    }

    #[test]
    fn a_swapped_pair_ranks_second() {
        let videos = vec![0.0, 1.0, 1.0, 0.0];
        let texts = vec![1.0, 0.0, 0.0, 1.0];
        let m = retrieval(&embeddings(videos, texts, 2, 2), &["a", "b"]).expect("scores");
        assert_eq!((m.r1, m.r5, m.median_rank), (0.0, 1.0, 2.0));
    }

    #[test]
    fn repeated_captions_count_any_matching_video() {
        let videos = vec![0.0, 1.0, 1.0, 0.0];
        let texts = vec![1.0, 0.0, 0.0, 1.0];
        let m = retrieval(&embeddings(videos, texts, 2, 2), &["same", "same"]).expect("scores");
        assert_eq!(m.r1, 1.0);
    }

    proptest! {
        #[test]
        fn recall_grows_with_k_and_ranks_are_in_range(values in prop::collection::vec(-1f32..1f32, 2 * 12 * 4), words in prop::collection::vec(0u8..4, 12)) {
            let (n, e) = (12, 4);
            let captions: Vec<String> = words.iter().map(|w| format!("c{w}")).collect();
            let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
            let m = retrieval(&embeddings(values[..n * e].to_vec(), values[n * e..].to_vec(), n, e), &refs).expect("scores");
            prop_assert!(m.r1 <= m.r5 && m.r5 <= m.r10 && m.r10 <= 1.0);
            prop_assert!(m.median_rank >= 1.0 && m.median_rank <= n as f64);
        }
    }
}
