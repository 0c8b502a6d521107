// oneDNN's bf16 and fp32 matmul and 3x3 conv on SD 1.5's shapes, and the kernel it picks (issue 16: is
// there a faster bf16 route than XLA:CPU's on this CPU, AMX or other?). The same shapes through XLA:CPU:
// scripts/bf16_kernels.py. oneDNN from PyPI, outside the package (a measurement, not a dependency):
//   pip download --no-deps onednn-cpu-gomp==2023.2.0 onednn-devel==2026.1.0   (the gomp build: libdnnl.so
//   alone; the 2026.1 build needs Intel's SYCL/TBB runtimes), unzip libdnnl.so.3 and the headers, set
//   DNNL_CPU_RUNTIME / DNNL_CPU_THREADING_RUNTIME to DNNL_RUNTIME_OMP, DNNL_GPU_RUNTIME to DNNL_RUNTIME_NONE
//   and drop DNNL_WITH_SYCL in include/oneapi/dnnl/dnnl_config.h, then
//   gcc -O2 -Iinclude scripts/onednn_bf16.c -o onednn_bf16 -Llib -l:libdnnl.so.3 -Wl,-rpath,lib
//   OMP_NUM_THREADS=2 ./onednn_bf16
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "oneapi/dnnl/dnnl.h"
#define CHECK(f) do { dnnl_status_t s = f; if (s != dnnl_success) { printf("%s failed: %d\n", #f, s); exit(1);} } while (0)
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static dnnl_memory_t mem(dnnl_engine_t eng, const_dnnl_memory_desc_t md) {
  dnnl_memory_t m; CHECK(dnnl_memory_create(&m, md, eng, DNNL_MEMORY_ALLOCATE)); return m; }
static void run(dnnl_engine_t eng, dnnl_stream_t st, dnnl_primitive_desc_t pd, const char *name, double flops) {
  dnnl_primitive_t p; CHECK(dnnl_primitive_create(&p, pd));
  const_dnnl_memory_desc_t s = dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0);
  const_dnnl_memory_desc_t w = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
  const_dnnl_memory_desc_t d = dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0);
  dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, mem(eng, s)}, {DNNL_ARG_WEIGHTS, mem(eng, w)}, {DNNL_ARG_DST, mem(eng, d)}};
  const char *impl; CHECK(dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl));
  CHECK(dnnl_primitive_execute(p, st, 3, args)); CHECK(dnnl_stream_wait(st));
  int n = 10; double t0 = now();
  for (int i = 0; i < n; i++) CHECK(dnnl_primitive_execute(p, st, 3, args));
  CHECK(dnnl_stream_wait(st));
  double dt = (now() - t0) / n;
  printf("%-40s %-28s %8.2f ms  %7.0f GFLOP/s\n", name, impl, 1e3 * dt, flops / dt / 1e9);
}
int main(void) {
  dnnl_engine_t eng; dnnl_stream_t st;
  CHECK(dnnl_engine_create(&eng, dnnl_cpu, 0)); CHECK(dnnl_stream_create(&st, eng, dnnl_stream_default_flags));
  dnnl_data_type_t types[2] = {dnnl_bf16, dnnl_f32};
  const char *names[2] = {"bf16", "f32"};
  for (int k = 0; k < 2; k++) {
    dnnl_memory_desc_t a, b, c; dnnl_dims_t da = {16384, 320}, db = {320, 2560}, dc = {16384, 2560};
    CHECK(dnnl_memory_desc_create_with_tag(&a, 2, da, types[k], dnnl_ab));
    CHECK(dnnl_memory_desc_create_with_tag(&b, 2, db, types[k], dnnl_format_tag_any));
    CHECK(dnnl_memory_desc_create_with_tag(&c, 2, dc, dnnl_f32, dnnl_ab));
    dnnl_primitive_desc_t pd; CHECK(dnnl_matmul_primitive_desc_create(&pd, eng, a, b, NULL, c, NULL));
    char name[64]; snprintf(name, 64, "matmul 16384x320x2560 %s->f32", names[k]);
    run(eng, st, pd, name, 2.0 * 16384 * 320 * 2560);
    dnnl_memory_desc_t x, w, y; dnnl_dims_t dx = {4, 320, 64, 64}, dw = {320, 320, 3, 3}, dy = {4, 320, 64, 64};
    dnnl_dims_t strides = {1, 1}, dil = {0, 0}, pad = {1, 1};
    CHECK(dnnl_memory_desc_create_with_tag(&x, 4, dx, types[k], dnnl_nhwc));
    CHECK(dnnl_memory_desc_create_with_tag(&w, 4, dw, types[k], dnnl_format_tag_any));
    CHECK(dnnl_memory_desc_create_with_tag(&y, 4, dy, types[k], dnnl_nhwc));
    CHECK(dnnl_convolution_forward_primitive_desc_create(&pd, eng, dnnl_forward_inference, dnnl_convolution_direct,
        x, w, NULL, y, strides, dil, pad, pad, NULL));
    snprintf(name, 64, "conv3x3 (4,64,64,320)->320 %s", names[k]);
    run(eng, st, pd, name, 2.0 * 4 * 64 * 64 * 320 * 320 * 9);
  }
  return 0;
}
