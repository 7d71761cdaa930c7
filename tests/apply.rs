//! Devices validate what they receive: a bad parameter set changes nothing.

mod common;

use mmpg::wire::{Envelope, MessageKind, encode_f32_tensors};
use mmpg::{
    CloudModel, DataSource, DeviceId, DeviceModel, DomainSpec, HostTensor, ModelError, Quantisation, QuantisedTensor,
    Split,
};
use mmpg_backends::BurnDevice;
use mmpg_lmm::{LmmCloud, LmmSettings};
use mmpg_synthetic::{Synthetic, SyntheticSettings};
use proptest::prelude::*;

fn device_model() -> (Box<dyn DeviceModel>, Vec<mmpg::Clip>) {
    let data = Synthetic::new(SyntheticSettings::default()).expect("valid");
    let cpu = BurnDevice::Flex(Default::default());
    let cloud = LmmCloud::new(LmmSettings::default(), data.task(), &BurnDevice::autodiff(cpu.clone())).expect("model");
    let clips = data.clips(&DomainSpec::clean("probe", 5), Split::Test, 6, 0).expect("clips");
    (cloud.export(&mmpg::DeviceDescriptor::cpu()).expect("export"), clips)
}

#[derive(Debug, Clone)]
enum Corruption {
    NonFinite(usize, usize, f32),
    Reshape(usize),
    DropSlot(usize),
    ExtraSlot,
    OtherSchema,
}

fn corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        (0usize..5, any::<usize>(), prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)])
            .prop_map(|(s, i, v)| Corruption::NonFinite(s, i, v)),
        (0usize..5).prop_map(Corruption::Reshape),
        (0usize..5).prop_map(Corruption::DropSlot),
        Just(Corruption::ExtraSlot),
        Just(Corruption::OtherSchema),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn apply_rejects_bad_params_and_keeps_the_previous_ones(c in corruption()) {
        let (mut model, clips) = device_model();
        let before = model.current_params();
        let logits = model.answer_logits(&clips).expect("forward");
        let mut bad = before.clone();
        let names: Vec<String> = bad.tensors.keys().cloned().collect();
        match c {
            Corruption::NonFinite(s, i, v) => {
                let t = bad.tensors.get_mut(&names[s]).expect("slot");
                let mut values = t.values().to_vec();
                let at = i % values.len();
                values[at] = v;
                *t = HostTensor::new(t.shape().to_vec(), values).expect("same shape");
            }
            Corruption::Reshape(s) => {
                let t = bad.tensors.get_mut(&names[s]).expect("slot");
                let mut values = t.values().to_vec();
                values.push(0.0);
                *t = HostTensor::new(vec![values.len()], values).expect("1-D");
            }
            Corruption::DropSlot(s) => { bad.tensors.remove(&names[s]); }
            Corruption::ExtraSlot => { bad.tensors.insert("backdoor".into(), HostTensor::zeros(vec![1])); }
            Corruption::OtherSchema => bad.schema_hash.0 ^= 1,
        }
        // Through the wire as a peer would send it, then applied. The cloud's encoder refuses
        // non-finite values, so a forged payload carries them: the device's decoder must refuse
        // it; everything else is refused by the device's validation.
        let is_non_finite = matches!(c, Corruption::NonFinite(..));
        let envelope = match Envelope::params(DeviceId("d".into()), 1, &bad) {
            Ok(envelope) => {
                prop_assert!(!is_non_finite, "the sender encoded {c:?}");
                envelope
            }
            Err(e) => {
                prop_assert!(is_non_finite, "the sender refused {c:?}: {e}");
                let forged = encode_f32_tensors(&bad.tensors, Vec::<(String, String)>::new());
                Envelope::new(MessageKind::Params, bad.schema_hash, DeviceId("d".into()), 1, forged).expect("small")
            }
        };
        let bytes = envelope.encode().expect("encodes");
        match Envelope::decode(&bytes).and_then(|e| e.to_params()) {
            Err(e) => prop_assert!(is_non_finite, "the wire refused {c:?}: {e}"),
            Ok(received) => {
                prop_assert!(!is_non_finite, "non-finite values passed the wire");
                let refused = model.apply(received);
                prop_assert!(matches!(refused, Err(ModelError::Params(_))), "{refused:?}");
            }
        }
        prop_assert_eq!(model.current_params(), before);
        prop_assert_eq!(model.answer_logits(&clips).expect("forward"), logits);
    }

    #[test]
    fn applied_params_are_bit_exact_with_what_was_sent(
        scale in -2f32..2f32,
        encoding in prop_oneof![Just(Quantisation::F32), Just(Quantisation::F16), Just(Quantisation::Int8)],
    ) {
        let (mut model, clips) = device_model();
        let mut params = model.current_params();
        for t in params.tensors.values_mut() {
            let values = t.values().iter().enumerate().map(|(i, v)| v + scale * ((i % 7) as f32 - 3.0) * 1e-2).collect();
            *t = HostTensor::new(t.shape().to_vec(), values).expect("same shape");
        }
        let received = Envelope::params_encoded(DeviceId("d".into()), 1, &params, encoding)
            .and_then(|e| e.encode())
            .and_then(|bytes| Envelope::decode(&bytes))
            .and_then(|e| e.to_params())
            .expect("round trip");
        model.apply(received).expect("valid params apply");
        // What the cloud generated, after the download encoding's dequantisation (f32: itself).
        let mut expected = params.clone();
        for t in expected.tensors.values_mut() {
            *t = QuantisedTensor::quantise(t, encoding).expect("finite").dequantise().expect("dequantises");
        }
        let bits = |p: &mmpg::GeneratedParams| -> Vec<u32> { p.tensors.values().flat_map(|t| t.values().iter().map(|v| v.to_bits())).collect() };
        prop_assert_eq!(bits(&model.current_params()), bits(&expected));
        if encoding == Quantisation::F32 {
            prop_assert_eq!(bits(&model.current_params()), bits(&params));
        }
        prop_assert!(model.answer_logits(&clips).expect("forward").is_finite());
    }
}
