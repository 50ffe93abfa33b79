"""Hints the runtime gives without changing anything: a CPU's native bf16 instructions."""

from accuvqa.runtime import native_bf16_flags


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    zen4 = tmp_path / "zen4"
    zen4.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert native_bf16_flags(str(zen4)) == ["avx512_bf16"]
    sapphire = tmp_path / "spr"
    sapphire.write_text("flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert native_bf16_flags(str(sapphire)) == ["avx512_bf16", "amx_bf16"]
    older = tmp_path / "skylake"
    older.write_text("flags\t\t: avx2 avx512f avx512bw\n")
    assert native_bf16_flags(str(older)) == []
    assert native_bf16_flags(str(tmp_path / "absent")) == []
