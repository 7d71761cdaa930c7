//! Per-video feature files: `.npy` arrays and `.safetensors` files, parsed, never trusted.
//!
//! `.npy` goes through `npyz`; `.safetensors` through `safetensors`. Both read every float
//! layout their writers produce (float16, bfloat16, float32, float64; either byte order and,
//! for `.npy`, Fortran order) into a row-major f32 [`HostTensor`].

use mmpg::HostTensor;
use py_literal::Value;
use safetensors::{Dtype, SafeTensors};

/// Why a feature file could not be read. The caller adds the file's path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeaturesError {
    /// The `.npy` preamble (magic, version, header length) is wrong.
    #[error("not an .npy file: {0}")]
    NotNpy(String),
    /// The `.npy` header dictionary is malformed.
    #[error("malformed .npy header: {0}")]
    Header(String),
    /// An element type features cannot have.
    #[error("unsupported dtype {0}: features must be float16, bfloat16, float32 or float64")]
    Dtype(String),
    /// The header claims a shape whose size does not fit in memory addresses.
    #[error("shape {0:?} overflows")]
    Overflow(Vec<u64>),
    /// The data does not hold exactly what the shape and dtype need.
    #[error("shape {shape:?} of {dtype} needs {needed} bytes of data, found {found}")]
    Size {
        /// The declared shape.
        shape: Vec<u64>,
        /// The declared element type.
        dtype: String,
        /// Bytes the shape needs.
        needed: u64,
        /// Bytes present.
        found: usize,
    },
    /// The `safetensors` container is malformed.
    #[error("not a safetensors file: {0}")]
    Safetensors(String),
    /// The file holds no tensor named `features`.
    #[error("no tensor `features` (tensors present: {0})")]
    NoFeatures(String),
}

/// NumPy's own reader refuses longer headers unless told otherwise (`max_header_size`): real
/// feature files have headers of a few dozen bytes.
const MAX_NPY_HEADER: usize = 10_000;

/// The header parser recurses per bracket and overflows a thread's stack at a few thousand
/// levels; features need two (the dict and its shape).
const MAX_NPY_NESTING: usize = 8;

/// Parses an `.npy` array of float16, float32 or float64 in either byte order (`<`, `>`, or
/// `=`/none for this machine's, as NumPy reads them) and either C or Fortran order, into a
/// row-major f32 tensor.
pub fn parse_npy(bytes: &[u8]) -> Result<HostTensor, FeaturesError> {
    let (header_text, body) = split_npy(bytes)?;
    let dict = NpyDict::parse(header_text)?;
    // npyz multiplies the shape out unchecked (a panic where overflow checks are on) and refuses
    // `=`, which NumPy reads as this machine's order: both are settled before npyz sees the header.
    let elements = checked_elements(&dict.shape)?;
    let header = npyz::NpyHeader::from_reader(&dict.encode()?[..]).map_err(|e| FeaturesError::Header(e.to_string()))?;
    let npyz::DType::Plain(type_str) = header.dtype() else {
        return Err(FeaturesError::Dtype(format!("`{}`", dict.descr)));
    };
    let width = match (type_str.type_char(), type_str.size_field()) {
        (npyz::TypeChar::Float, size @ (2 | 4 | 8)) => size,
        _ => return Err(FeaturesError::Dtype(format!("`{}`", dict.descr))),
    };
    // Checked before reading: npyz reserves the whole shape's worth of values up front.
    let needed = elements.checked_mul(width).ok_or_else(|| FeaturesError::Overflow(dict.shape.clone()))?;
    if needed != body.len() as u64 {
        return Err(FeaturesError::Size { shape: dict.shape, dtype: dict.descr, needed, found: body.len() });
    }
    let file = npyz::NpyFile::with_header(header, body);
    let read_error = |e: std::io::Error| FeaturesError::Header(e.to_string());
    let values: Vec<f32> = match width {
        2 => file.into_vec::<half::f16>().map_err(read_error)?.into_iter().map(f32::from).collect(),
        4 => file.into_vec::<f32>().map_err(read_error)?,
        _ => file.into_vec::<f64>().map_err(read_error)?.into_iter().map(|v| v as f32).collect(),
    };
    // `checked_elements` bounded the product of the dimensions, so each fits a usize.
    let shape: Vec<usize> = dict.shape.iter().map(|d| *d as usize).collect();
    let values = if dict.fortran_order { fortran_to_row_major(&shape, &values) } else { values };
    HostTensor::new(shape, values).map_err(|e| FeaturesError::Header(e.to_string()))
}

/// The header text and the data of an `.npy` file, after checking the preamble.
fn split_npy(bytes: &[u8]) -> Result<(&str, &[u8]), FeaturesError> {
    if bytes.get(..6) != Some(b"\x93NUMPY".as_slice()) {
        return Err(FeaturesError::NotNpy("no \\x93NUMPY magic".into()));
    }
    let truncated = || FeaturesError::NotNpy("truncated before the header".into());
    let (header_len, start) = match bytes.get(6..8).ok_or_else(truncated)? {
        [1, 0] => {
            let b = bytes.get(8..10).ok_or_else(truncated)?;
            (usize::from(u16::from_le_bytes([b[0], b[1]])), 10)
        }
        [2 | 3, 0] => {
            let b = bytes.get(8..12).ok_or_else(truncated)?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        [major, minor] => return Err(FeaturesError::NotNpy(format!("unknown format version {major}.{minor}"))),
        _ => return Err(truncated()),
    };
    if header_len > MAX_NPY_HEADER {
        return Err(FeaturesError::Header(format!(
            "{header_len} bytes long; NumPy itself refuses headers over {MAX_NPY_HEADER}"
        )));
    }
    let header = bytes
        .get(start..start + header_len)
        .ok_or_else(|| FeaturesError::NotNpy(format!("the header claims {header_len} bytes, the file ends before")))?;
    let text = std::str::from_utf8(header).map_err(|_| FeaturesError::Header("not text".into()))?;
    Ok((text, &bytes[start + header_len..]))
}

/// The three keys of an `.npy` header that features need, normalised for npyz.
#[derive(Debug)]
struct NpyDict {
    descr: String,
    fortran_order: bool,
    shape: Vec<u64>,
}

impl NpyDict {
    fn parse(text: &str) -> Result<Self, FeaturesError> {
        let bad = |what: &str| FeaturesError::Header(what.to_string());
        let mut depth = 0usize;
        for b in text.bytes() {
            match b {
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if depth > MAX_NPY_NESTING {
                return Err(bad("brackets nested too deeply"));
            }
        }
        // The writer pads with spaces and ends with a newline, which the literal grammar refuses.
        let value: Value = text.trim_end().parse().map_err(|e: py_literal::ParseError| bad(&e.to_string()))?;
        let dict = value.as_dict().ok_or_else(|| bad("not a dictionary"))?;
        let get = |key: &str| {
            dict.iter()
                .find(|(k, _)| k.as_string().is_some_and(|k| k == key))
                .map(|(_, v)| v)
                .ok_or_else(|| FeaturesError::Header(format!("no `{key}`")))
        };
        let descr = match get("descr")? {
            Value::String(s) => s.clone(),
            _ => return Err(FeaturesError::Dtype("of structured records".into())),
        };
        let fortran_order = get("fortran_order")?.as_boolean().ok_or_else(|| bad("`fortran_order` is not a bool"))?;
        let dims = match get("shape")? {
            Value::Tuple(dims) | Value::List(dims) => dims,
            _ => return Err(bad("`shape` is not a tuple")),
        };
        let shape = dims
            .iter()
            .map(|d| d.as_integer().and_then(|d| u64::try_from(d).ok()))
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| bad("`shape` holds something other than non-negative integers"))?;
        Ok(Self { descr, fortran_order, shape })
    }

    /// A version-2 preamble and header npyz reads, with NumPy's "native order" spelt out.
    fn encode(&self) -> Result<Vec<u8>, FeaturesError> {
        let native = if cfg!(target_endian = "big") { ">" } else { "<" };
        let descr = match self.descr.strip_prefix('=') {
            Some(rest) => format!("{native}{rest}"),
            None if self.descr.starts_with(['<', '>', '|']) => self.descr.clone(),
            None => format!("{native}{}", self.descr),
        };
        let dict = Value::Dict(vec![
            (Value::String("descr".into()), Value::String(descr)),
            (Value::String("fortran_order".into()), Value::Boolean(self.fortran_order)),
            (
                Value::String("shape".into()),
                Value::Tuple(self.shape.iter().map(|d| Value::Integer((*d).into())).collect()),
            ),
        ]);
        let text = dict.format_ascii().map_err(|e| FeaturesError::Header(e.to_string()))?;
        let mut out = b"\x93NUMPY\x02\x00".to_vec();
        out.extend((text.len() as u32).to_le_bytes());
        out.extend(text.as_bytes());
        Ok(out)
    }
}

/// The number of elements of `shape`, refusing shapes whose non-zero dimensions multiply past
/// a `usize` (then no partial product, in any order, overflows either).
fn checked_elements(shape: &[u64]) -> Result<u64, FeaturesError> {
    let overflow = || FeaturesError::Overflow(shape.to_vec());
    let nonzero =
        shape.iter().filter(|d| **d != 0).try_fold(1u64, |acc, d| acc.checked_mul(*d)).ok_or_else(overflow)?;
    if usize::try_from(nonzero).is_err() {
        return Err(overflow());
    }
    Ok(if shape.contains(&0) { 0 } else { nonzero })
}

/// Reorders values stored first-axis-fastest (Fortran) into last-axis-fastest (row-major).
fn fortran_to_row_major(shape: &[usize], values: &[f32]) -> Vec<f32> {
    let mut strides = Vec::with_capacity(shape.len());
    let mut stride = 1;
    for d in shape {
        strides.push(stride);
        stride *= d;
    }
    let mut index = vec![0usize; shape.len()];
    let mut out = Vec::with_capacity(values.len());
    for _ in 0..values.len() {
        out.push(values[index.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()]);
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

/// `.npy` (version 1) bytes of a little-endian f32 array in C order, as NumPy writes it.
pub fn encode_npy(shape: &[usize], values: &[f32]) -> Vec<u8> {
    encode_npy_as("<f4", false, shape, &values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

/// `.npy` (version 1) bytes of `data` under any header (`descr` such as `>f8`, Fortran or C
/// order), padded as NumPy pads it; `data` must already be in that layout.
pub fn encode_npy_as(descr: &str, fortran_order: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_text = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let order = if fortran_order { "True" } else { "False" };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// Reads the `features` tensor of a `.safetensors` file (F32, F16, BF16 or F64) as f32; other
/// tensors in the file (frame times, ids, …) are left alone.
pub fn parse_safetensors_features(bytes: &[u8]) -> Result<HostTensor, FeaturesError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| FeaturesError::Safetensors(e.to_string()))?;
    let view = file.tensor("features").map_err(|_| {
        let mut names = file.names();
        names.sort();
        FeaturesError::NoFeatures(if names.is_empty() {
            "none".into()
        } else {
            names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
        })
    })?;
    let data = view.data();
    // safetensors stores little-endian values and has checked `data` against shape × dtype.
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => mmpg::tensor::f32s_from_le_bytes(data),
        Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => return Err(FeaturesError::Dtype(format!("{other:?} of tensor `features`"))),
    };
    HostTensor::new(view.shape().to_vec(), values).map_err(|e| FeaturesError::Safetensors(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The 3 × 2 array every NumPy-written fixture holds; its values are exact in float16.
    const ROWS: [f32; 6] = [0.5, -1.25, 2.0, 3.5, -4.75, 6.0];

    fn npy(descr: &str, fortran_order: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
        encode_npy_as(descr, fortran_order, shape, data)
    }

    #[test]
    fn numpy_written_files_read_into_row_major_f32() {
        // `np.save` of `a.astype(dtype)` / `np.asfortranarray(...)` with NumPy 2.4.
        let fixtures: [(&str, &[u8]); 6] = [
            ("be_f4_fortran", include_bytes!("../tests/fixtures/be_f4_fortran.npy")),
            ("le_f4_fortran", include_bytes!("../tests/fixtures/le_f4_fortran.npy")),
            ("le_f2", include_bytes!("../tests/fixtures/le_f2.npy")),
            ("be_f2_fortran", include_bytes!("../tests/fixtures/be_f2_fortran.npy")),
            ("le_f8", include_bytes!("../tests/fixtures/le_f8.npy")),
            ("be_f8", include_bytes!("../tests/fixtures/be_f8.npy")),
        ];
        for (name, bytes) in fixtures {
            let t = parse_npy(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(t.shape(), &[3, 2], "{name}");
            assert_eq!(t.values(), &ROWS, "{name}");
        }
        let t = parse_npy(include_bytes!("../tests/fixtures/le_f4_fortran_3d.npy")).expect("3-d");
        assert_eq!(t.shape(), &[2, 3, 4]);
        let arange: Vec<f32> = (0..24).map(|i| i as f32).collect();
        assert_eq!(t.values(), &arange[..], "np.arange(24).reshape(2, 3, 4) in Fortran order");
    }

    #[test]
    fn a_fortran_order_array_is_transposed_not_reread() {
        // Written by hand per the format spec: big-endian, columns stored one after the other.
        let columns = [0.5f32, 2.0, -4.75, -1.25, 3.5, 6.0];
        let data: Vec<u8> = columns.iter().flat_map(|v| v.to_be_bytes()).collect();
        let bytes = npy(">f4", true, &[3, 2], &data);
        assert!(bytes[10..].starts_with(b"{'descr': '>f4', 'fortran_order': True, 'shape': (3, 2), }"));
        assert_eq!((bytes.len() - data.len()) % 64, 0, "header padded to 64 bytes");
        assert_eq!(bytes, include_bytes!("../tests/fixtures/be_f4_fortran.npy"), "byte for byte what NumPy wrote");
        let t = parse_npy(&bytes).expect("parses");
        assert_eq!(t.shape(), &[3, 2]);
        assert_eq!(t.values(), &ROWS);
        // The same bytes read row-major would be another matrix: the order flag matters.
        let c_order = parse_npy(&npy(">f4", false, &[3, 2], &data)).expect("parses");
        assert_ne!(c_order.values(), t.values());
    }

    #[test]
    fn native_and_unmarked_byte_orders_read_as_numpy_reads_them() {
        let native: Vec<u8> = ROWS.iter().flat_map(|v| v.to_ne_bytes()).collect();
        for descr in ["=f4", "f4"] {
            let t = parse_npy(&npy(descr, false, &[3, 2], &native)).unwrap_or_else(|e| panic!("{descr}: {e}"));
            assert_eq!(t.values(), &ROWS, "{descr}");
        }
        let half: Vec<u8> = ROWS.iter().flat_map(|v| half::f16::from_f32(*v).to_ne_bytes()).collect();
        assert_eq!(parse_npy(&npy("=f2", false, &[3, 2], &half)).expect("=f2").values(), &ROWS);
    }

    #[test]
    fn shapes_claiming_more_than_the_file_holds_are_errors_before_any_allocation() {
        let eight = [0u8; 8];
        for (shape, expected) in [
            ("(1099511627776, 1099511627776)", "overflows"),
            ("(0, 4294967296, 4294967296)", "overflows"),
            ("(1000000000000000000000000000000,)", "non-negative integers"),
            ("(-1, 2)", "non-negative integers"),
            ("(1099511627776, 1048576)", "needs 4611686018427387904 bytes of data, found 8"),
        ] {
            let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n");
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend((header.len() as u16).to_le_bytes());
            bytes.extend(header.as_bytes());
            bytes.extend(eight);
            let err = parse_npy(&bytes).expect_err(shape).to_string();
            assert!(err.contains(expected), "{shape}: {err}");
        }
    }

    #[test]
    fn malformed_and_non_feature_files_are_named_errors() {
        let f4: Vec<u8> = ROWS.iter().flat_map(|v| v.to_le_bytes()).collect();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"PK\x03\x04 a zip, not an npy".to_vec(), "no \\x93NUMPY magic"),
            (b"\x93NUMPY\x04\x00\x10\x00".to_vec(), "unknown format version 4.0"),
            (b"\x93NUMPY\x01\x00\xff\x00{}".to_vec(), "the file ends before"),
            (b"\x93NUMPY\x02\x00\xff\xff\xff\xff{}".to_vec(), "NumPy itself refuses"),
            (npy("<i4", false, &[3, 2], &[0; 24]), "unsupported dtype `<i4`"),
            (npy("<c8", false, &[3], &[0; 24]), "unsupported dtype `<c8`"),
            (npy("<f4", false, &[3, 2], &f4[..20]), "needs 24 bytes of data, found 20"),
            (npy("<f4", false, &[2, 2], &f4), "needs 16 bytes of data, found 24"),
        ];
        for (bytes, expected) in cases {
            let err = parse_npy(&bytes).expect_err(expected).to_string();
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
        let header_only = |text: &str| {
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend((text.len() as u16).to_le_bytes());
            bytes.extend(text.as_bytes());
            parse_npy(&bytes).expect_err(text).to_string()
        };
        assert!(header_only(&format!("{}1{}", "(".repeat(4000), ")".repeat(4000))).contains("nested too deeply"));
        assert!(header_only("[1, 2]").contains("not a dictionary"));
        assert!(header_only("{'descr': '<f4', 'shape': (1,), }").contains("no `fortran_order`"));
        let structured = "{'descr': [('x', '<f4')], 'fortran_order': False, 'shape': (1,), }";
        assert!(header_only(structured).contains("structured"));
    }

    #[test]
    fn a_version_3_header_reads_like_version_1() {
        let f4: Vec<u8> = ROWS.iter().flat_map(|v| v.to_le_bytes()).collect();
        let v1 = npy("<f4", false, &[3, 2], &f4);
        let header_len = usize::from(u16::from_le_bytes([v1[8], v1[9]]));
        let mut v3 = b"\x93NUMPY\x03\x00".to_vec();
        v3.extend((header_len as u32).to_le_bytes());
        v3.extend(&v1[10..]);
        assert_eq!(parse_npy(&v3).expect("v3").values(), &ROWS);
    }

    fn safetensors_file(tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) -> Vec<u8> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, shape, data)| {
                (name.to_string(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).expect("view"))
            })
            .collect();
        safetensors::serialize(views, None).expect("serialize")
    }

    #[test]
    fn safetensors_features_read_in_every_float_width() {
        let encodings: [(Dtype, Vec<u8>); 4] = [
            (Dtype::F32, ROWS.iter().flat_map(|v| v.to_le_bytes()).collect()),
            (Dtype::F16, ROWS.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
            (Dtype::BF16, ROWS.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()),
            (Dtype::F64, ROWS.iter().flat_map(|v| f64::from(*v).to_le_bytes()).collect()),
        ];
        for (dtype, data) in encodings {
            let t = parse_safetensors_features(&safetensors_file(vec![("features", dtype, vec![3, 2], data)]))
                .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
            assert_eq!(t.shape(), &[3, 2], "{dtype:?}");
            assert_eq!(t.values(), &ROWS, "{dtype:?}");
        }
    }

    #[test]
    fn other_tensors_beside_the_features_are_left_alone() {
        let features: Vec<u8> = ROWS.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let frame_ids: Vec<u8> = [0i64, 8, 16].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = safetensors_file(vec![
            ("features", Dtype::F16, vec![3, 2], features),
            ("frame_ids", Dtype::I64, vec![3], frame_ids),
            ("fps", Dtype::U8, vec![1], vec![30]),
        ]);
        assert_eq!(parse_safetensors_features(&bytes).expect("read").values(), &ROWS);
        let without =
            safetensors_file(vec![("fps", Dtype::U8, vec![1], vec![30]), ("clip", Dtype::F32, vec![1], vec![0; 4])]);
        let err = parse_safetensors_features(&without).expect_err("no features").to_string();
        assert!(err.contains("no tensor `features` (tensors present: `clip`, `fps`)"), "{err}");
        let ints = safetensors_file(vec![("features", Dtype::I32, vec![3, 2], vec![0; 24])]);
        let err = parse_safetensors_features(&ints).expect_err("ints").to_string();
        assert!(err.contains("unsupported dtype I32"), "{err}");
        let err = parse_safetensors_features(b"\x05\x00\x00\x00\x00\x00\x00\x00{}").expect_err("short").to_string();
        assert!(err.starts_with("not a safetensors file"), "{err}");
    }

    /// Bytes of `values` (row-major) as `descr` would store them, in C or Fortran order.
    fn stored(descr: &str, fortran_order: bool, shape: &[usize], values: &[f32]) -> Vec<u8> {
        let order: Vec<f32> = if fortran_order {
            // Column-major: the reverse-shape row-major traversal of the transposed array.
            let mut out = Vec::with_capacity(values.len());
            let strides: Vec<usize> =
                (0..shape.len()).map(|axis| shape[axis + 1..].iter().product::<usize>()).collect();
            let mut index = vec![0usize; shape.len()];
            for _ in 0..values.len() {
                out.push(values[index.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()]);
                for axis in 0..shape.len() {
                    index[axis] += 1;
                    if index[axis] < shape[axis] {
                        break;
                    }
                    index[axis] = 0;
                }
            }
            out
        } else {
            values.to_vec()
        };
        let big = descr.starts_with('>') || (descr.starts_with('=') && cfg!(target_endian = "big"));
        order
            .iter()
            .flat_map(|v| match (&descr[2..], big) {
                ("2", false) => half::f16::from_f32(*v).to_le_bytes().to_vec(),
                ("2", true) => half::f16::from_f32(*v).to_be_bytes().to_vec(),
                ("4", false) => v.to_le_bytes().to_vec(),
                ("4", true) => v.to_be_bytes().to_vec(),
                (_, false) => f64::from(*v).to_le_bytes().to_vec(),
                (_, true) => f64::from(*v).to_be_bytes().to_vec(),
            })
            .collect()
    }

    proptest! {
        #[test]
        fn every_float_dtype_and_order_round_trips(
            descr in prop::sample::select(vec!["<f2", ">f2", "=f2", "<f4", ">f4", "=f4", "<f8", ">f8", "=f8"]),
            fortran_order in any::<bool>(),
            shape in prop::collection::vec(1usize..5, 0..4),
            seed in any::<u64>(),
        ) {
            let n: usize = shape.iter().product();
            // Quarters in ±64 are exact in every width, so the round trip is exact.
            let values: Vec<f32> =
                (0..n as u64).map(|i| ((seed.rotate_left(i as u32 * 7) % 513) as f32 - 256.0) / 4.0).collect();
            let bytes = npy(descr, fortran_order, &shape, &stored(descr, fortran_order, &shape, &values));
            let t = parse_npy(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(t.shape(), &shape[..]);
            prop_assert_eq!(t.values(), &values[..]);
            let mut truncated = bytes.clone();
            truncated.pop();
            prop_assert!(parse_npy(&truncated).is_err());
        }

        #[test]
        fn any_header_text_or_garbage_is_a_value_or_an_error(
            text in "[ -~]{0,120}", garbage in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend((text.len() as u16).to_le_bytes());
            bytes.extend(text.as_bytes());
            bytes.extend(&garbage);
            let _ = parse_npy(&bytes);
            let _ = parse_npy(&garbage);
            let _ = parse_safetensors_features(&garbage);
        }

        #[test]
        fn header_dicts_with_any_shape_are_a_value_or_an_error(
            dims in prop::collection::vec(prop_oneof![Just(0u64), 1u64..4, any::<u64>()], 0..5),
            descr in prop::sample::select(vec!["<f2", ">f4", "=f8", "<i8", "|b1", "<f16"]),
            fortran in any::<bool>(), body in 0usize..64,
        ) {
            let shape = dims.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
            let text = format!("{{'descr': '{descr}', 'fortran_order': {}, 'shape': ({shape},), }}", if fortran { "True" } else { "False" });
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend((text.len() as u16).to_le_bytes());
            bytes.extend(text.as_bytes());
            bytes.extend(vec![0u8; body]);
            if let Ok(t) = parse_npy(&bytes) {
                prop_assert_eq!(t.len(), t.shape().iter().product::<usize>());
            }
        }
    }
}
