//! sandnic: whole-system tests and benches live in tests/ and benches/.
