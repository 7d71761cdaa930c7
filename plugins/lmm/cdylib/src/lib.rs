//! `libmmpg_lmm_plugin.so`: the `lmm` model as a library that mmpg loads at run time, with the
//! Burn backends this build compiled in. A crate of its own because `mmpg-lmm` is also linked
//! statically into `mmpg` next to other plugin crates, where a second entry point would collide.

mmpg::export_plugins!(backends = mmpg_backends::compiled(); mmpg::Plugin::Model(mmpg_lmm::LMM));
