// A stand-in for the NVIDIA driver's libnvidia-ml.so.1, so that multigpu's
// real NVML loader (detail/nvml.hpp: dlopen, dlsym, the structs it passes)
// runs on a machine without a GPU. Two GPUs with scripted answers. Built
// twice: as a current driver (STANDIN_CURRENT_DRIVER: nvmlDeviceGetMemoryInfo_v2
// and nvmlDeviceGetComputeRunningProcesses_v3), and as one before R510 with
// the first versions only. The layouts are nvml.h's, written out here.

#include <cstdio>
#include <cstring>

using Device = void*;
struct PciInfo {  // nvmlPciInfo_t
  char bus_id_legacy[16];
  unsigned int domain, bus, device, pci_device_id, pci_subsystem_id;
  char bus_id[32];
};
struct MemoryV1 {  // nvmlMemory_t
  unsigned long long total, free, used;
};
struct MemoryV2 {  // nvmlMemory_v2_t
  unsigned int version;
  unsigned long long total, reserved, free, used;
};
struct ProcessV1 {  // nvmlProcessInfo_v1_t
  unsigned int pid;
  unsigned long long used_gpu_memory;
};
struct ProcessV2 {  // nvmlProcessInfo_t of _v2 and _v3
  unsigned int pid;
  unsigned long long used_gpu_memory;
  unsigned int gpu_instance_id, compute_instance_id;
};

namespace {
constexpr unsigned long long kMiB = 1ULL << 20;
constexpr unsigned long long kTotal = 81559 * kMiB;     // an H100 80GB HBM3
constexpr unsigned long long kReserved = 551 * kMiB;    // what nvidia-smi shows it reserving
constexpr unsigned long long kNotAvailable = ~0ULL;
int index_of(Device device) { return static_cast<int>(reinterpret_cast<unsigned long>(device)) - 1; }
// GPU 0: 40 processes of 1 MiB (more than a first buffer of 32); GPU 1: 3 GiB and "not available".
unsigned process_count(int gpu) { return gpu == 0 ? 40 : 2; }
unsigned long long process_memory(int gpu, unsigned i) {
  return gpu == 0 ? kMiB : (i == 0 ? 3072 * kMiB : kNotAvailable);
}
unsigned process_pid(int gpu, unsigned i) { return gpu == 0 ? 1000 + i : 4242 + i; }
unsigned long long used_of(int gpu) { return gpu == 0 ? 40 * kMiB : 3072 * kMiB; }

template <class Entry>
int processes(Device device, unsigned int* count, Entry* infos) {
  const int gpu = index_of(device);
  const unsigned needed = process_count(gpu);
  if (*count < needed) {
    *count = needed;
    return 7;  // NVML_ERROR_INSUFFICIENT_SIZE
  }
  for (unsigned i = 0; i < needed; ++i) {
    std::memset(&infos[i], 0, sizeof(Entry));
    infos[i].pid = process_pid(gpu, i);
    infos[i].used_gpu_memory = process_memory(gpu, i);
  }
  *count = needed;
  return 0;
}
}  // namespace

extern "C" {

int nvmlInit_v2() { return 0; }
int nvmlDeviceGetCount_v2(unsigned int* count) {
  *count = 2;
  return 0;
}
int nvmlDeviceGetHandleByIndex_v2(unsigned int index, Device* device) {
  if (index >= 2) return 2;  // NVML_ERROR_INVALID_ARGUMENT
  *device = reinterpret_cast<Device>(static_cast<unsigned long>(index) + 1);
  return 0;
}
int nvmlDeviceGetName(Device device, char* name, unsigned int length) {
  std::snprintf(name, length, "Stand-in GPU %d", index_of(device));
  return 0;
}
int nvmlDeviceGetUUID(Device device, char* uuid, unsigned int length) {
  std::snprintf(uuid, length, "GPU-57a4d100-0000-4000-8000-00000000000%d", index_of(device));
  return 0;
}
int nvmlDeviceGetPciInfo_v3(Device device, PciInfo* pci) {
  std::memset(pci, 0, sizeof(*pci));
  pci->domain = 0;
  pci->bus = 0x18 + static_cast<unsigned>(index_of(device));
  pci->device = 0;
  return 0;
}
int nvmlDeviceGetMemoryInfo(Device device, MemoryV1* memory) {
  memory->total = kTotal;
  memory->used = kReserved + used_of(index_of(device));  // v1 counts the reserved memory as used
  memory->free = memory->total - memory->used;
  return 0;
}
int nvmlDeviceGetCudaComputeCapability(Device, int* major, int* minor) {
  *major = 9;
  *minor = 0;
  return 0;
}
int nvmlSystemGetDriverVersion(char* version, unsigned int length) {
  std::snprintf(version, length, "%s", "999.1-stand-in");
  return 0;
}
const char* nvmlErrorString(int) { return "stand-in error"; }
int nvmlDeviceGetComputeRunningProcesses(Device device, unsigned int* count, ProcessV1* infos) {
  return processes(device, count, infos);
}

#if STANDIN_CURRENT_DRIVER
int nvmlDeviceGetMemoryInfo_v2(Device device, MemoryV2* memory) {
  if (memory->version != (static_cast<unsigned>(sizeof(MemoryV2)) | (2u << 24))) return 25;  // VERSION_MISMATCH
  memory->total = kTotal;
  memory->reserved = kReserved;
  memory->used = used_of(index_of(device));
  memory->free = kTotal - kReserved - memory->used;
  return 0;
}
int nvmlDeviceGetComputeRunningProcesses_v3(Device device, unsigned int* count, ProcessV2* infos) {
  return processes(device, count, infos);
}
#endif

}  // extern "C"
