//! `libmmpg_adr_plugin.so`: the `adr` anchor reasoner as a library that mmpg loads at run time.
//! A crate of its own because `mmpg-adr` is also linked statically into `mmpg` next to other
//! plugin crates, where a second entry point would collide.

mmpg::export_plugins!(mmpg::Plugin::AnchorReasoner(mmpg_adr::ADR));
