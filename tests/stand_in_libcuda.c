/* A stand-in for the CUDA driver library (libcuda.so.1), for tests/test_graph_if.py on a
 * machine without a GPU: each driver call DriverIfNodes makes through cuda-python logs its
 * arguments to stderr and returns fixed handles, so the test sees what would reach the real
 * driver. Built by the test with the cuda.h of the NVIDIA wheels beside torch. */
#define _GNU_SOURCE
#include <cuda.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define LOG(...) do { fprintf(stderr, "[driver] " __VA_ARGS__); fflush(stderr); } while (0)

static CUgraphNode capture_dependencies[2] = {(CUgraphNode)0xD001, (CUgraphNode)0xD002};
static CUgraphEdgeData capture_edges[2];
static CUgraph body_graphs[1] = {(CUgraph)0xB0D1};

/* cuda-python resolves every entry point through cuGetProcAddress, by "stub_" + its name
 * here. The exported names are given as symbols: cuda.h declares them with other types. */
int stand_in_driver_version(int *version) __asm__("cuDriverGetVersion");
int stand_in_proc_address(const char *symbol, void **function, int version, unsigned long long flags,
                          int *status) __asm__("cuGetProcAddress_v2");
int stand_in_proc_address_v1(const char *symbol, void **function, int version,
                             unsigned long long flags) __asm__("cuGetProcAddress");

int stand_in_driver_version(int *version) { *version = 13000; return 0; }

int stand_in_proc_address(const char *symbol, void **function, int version, unsigned long long flags,
                          int *status) {
    char name[256];
    (void)flags;
    snprintf(name, sizeof name, "stub_%s", symbol);
    *function = dlsym(RTLD_DEFAULT, name);
    /* cuda-bindings 13.5 asks for cuGraphAddNode's 13.1 ABI first; a 13.0 driver (580) has none */
    if (*function && version > 13000 && strcmp(symbol, "cuGraphAddNode") == 0) *function = NULL;
    if (status) *status = *function ? 0 : 1;
    return *function ? 0 : 500;  /* CUDA_ERROR_NOT_FOUND */
}

int stand_in_proc_address_v1(const char *symbol, void **function, int version, unsigned long long flags) {
    return stand_in_proc_address(symbol, function, version, flags, NULL);
}

CUresult stub_cuInit(unsigned flags) { (void)flags; return CUDA_SUCCESS; }

CUresult stub_cuGetErrorName(CUresult error, const char **name) { (void)error; *name = "CUDA_ERROR_STAND_IN"; return 0; }

CUresult stub_cuGetErrorString(CUresult error, const char **text) { (void)error; *text = "stand-in"; return 0; }

CUresult stub_cuCtxGetCurrent(CUcontext *context) {
    *context = (CUcontext)0xC7C7;
    LOG("cuCtxGetCurrent\n");
    return CUDA_SUCCESS;
}

CUresult stub_cuModuleLoadData(CUmodule *module, const void *image) {
    LOG("cuModuleLoadData length=%zu\n", strlen((const char *)image));
    *module = (CUmodule)0x3003;
    return CUDA_SUCCESS;
}

CUresult stub_cuModuleGetFunction(CUfunction *function, CUmodule module, const char *name) {
    LOG("cuModuleGetFunction module=%p name=%s\n", (void *)module, name);
    *function = (CUfunction)0xF00F;
    return CUDA_SUCCESS;
}

CUresult stub_cuFuncLoad(CUfunction function) {
    LOG("cuFuncLoad function=%p\n", (void *)function);
    return CUDA_SUCCESS;
}

CUresult stub_cuStreamCreate(CUstream *stream, unsigned flags) {
    LOG("cuStreamCreate flags=%u\n", flags);
    *stream = (CUstream)0x5005;
    return CUDA_SUCCESS;
}

CUresult stub_cuStreamGetCaptureInfo(CUstream stream, CUstreamCaptureStatus *status, cuuint64_t *id, CUgraph *graph,
                                     const CUgraphNode **dependencies, const CUgraphEdgeData **edges, size_t *count) {
    LOG("cuStreamGetCaptureInfo stream=%p\n", (void *)stream);
    if (status) *status = CU_STREAM_CAPTURE_STATUS_ACTIVE;
    if (id) *id = 77;
    if (graph) *graph = (CUgraph)0x6006;
    if (dependencies) *dependencies = capture_dependencies;
    if (edges) *edges = capture_edges;
    if (count) *count = 2;
    return CUDA_SUCCESS;
}

CUresult stub_cuGraphConditionalHandleCreate(CUgraphConditionalHandle *handle, CUgraph graph, CUcontext context,
                                             unsigned default_value, unsigned flags) {
    LOG("cuGraphConditionalHandleCreate graph=%p context=%p default=%u flags=%u\n", (void *)graph, (void *)context,
        default_value, flags);
    *handle = 0x123456789ABCULL;
    return CUDA_SUCCESS;
}

CUresult stub_cuLaunchKernel(CUfunction function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, unsigned shared, CUstream stream, void **params, void **extra) {
    LOG("cuLaunchKernel function=%p grid=%u,%u,%u block=%u,%u,%u shared=%u stream=%p extra=%p handle=%#llx "
        "flag=%#llx\n", (void *)function, gx, gy, gz, bx, by, bz, shared, (void *)stream, (void *)extra,
        (unsigned long long)*(uint64_t *)params[0], (unsigned long long)*(uint64_t *)params[1]);
    return CUDA_SUCCESS;
}

CUresult stub_cuGraphAddNode(CUgraphNode *node, CUgraph graph, const CUgraphNode *dependencies,
                             const CUgraphEdgeData *edges, size_t count, CUgraphNodeParams *params) {
    LOG("cuGraphAddNode graph=%p count=%zu dependencies=%p,%p type=%d handle=%#llx condition=%d size=%u context=%p\n",
        (void *)graph, count, count > 0 ? (void *)dependencies[0] : NULL, count > 1 ? (void *)dependencies[1] : NULL,
        params->type, (unsigned long long)params->conditional.handle, params->conditional.type,
        params->conditional.size, (void *)params->conditional.ctx);
    (void)edges;
    params->conditional.phGraph_out = body_graphs;
    *node = (CUgraphNode)0xC0DE;
    return CUDA_SUCCESS;
}

CUresult stub_cuStreamUpdateCaptureDependencies(CUstream stream, CUgraphNode *dependencies,
                                                const CUgraphEdgeData *edges, size_t count, unsigned flags) {
    LOG("cuStreamUpdateCaptureDependencies stream=%p count=%zu dependency=%p flags=%u\n", (void *)stream, count,
        count ? (void *)dependencies[0] : NULL, flags);
    (void)edges;
    return CUDA_SUCCESS;
}

CUresult stub_cuStreamBeginCaptureToGraph(CUstream stream, CUgraph graph, const CUgraphNode *dependencies,
                                          const CUgraphEdgeData *edges, size_t count, CUstreamCaptureMode mode) {
    LOG("cuStreamBeginCaptureToGraph stream=%p graph=%p count=%zu mode=%d\n", (void *)stream, (void *)graph, count,
        mode);
    (void)dependencies;
    (void)edges;
    return CUDA_SUCCESS;
}

CUresult stub_cuStreamEndCapture(CUstream stream, CUgraph *graph) {
    LOG("cuStreamEndCapture stream=%p\n", (void *)stream);
    *graph = body_graphs[0];
    return CUDA_SUCCESS;
}
