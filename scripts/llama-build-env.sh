# Sourced by the scripts that compile llama.cpp (scripts/dev, build-wheelhouse.sh, build_llama_server.sh).
#
# llama.cpp compiles for the build machine's CPU (-march=native). On Intel CPUs with AMX (Sapphire Rapids and
# later) that enables its AMX matrix kernels, which crash in ggml_backend_amx_mul_mat on the first batch of a
# Q4 model (llama.cpp#20824, closed unfixed; seen here with SmolLM2 Q4_1 through llama_decode). GCC lets an
# explicit -mno-* flag win over -march=native whatever their order, so these keep every other native
# instruction set and only leave AMX out. The flags are harmless on CPUs without AMX.
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CFLAGS="${CFLAGS:+$CFLAGS }$no_amx"
export CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$no_amx"
unset no_amx
