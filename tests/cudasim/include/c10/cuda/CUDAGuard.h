// cudasim stand-in for c10/cuda/CUDAGuard.h: there is one (simulated) device, so the guards only hold the device.
#pragma once

#include <c10/core/Device.h>
#include <optional>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) : device_(device) {}
  explicit CUDAGuard(c10::DeviceIndex index) : device_(c10::DeviceType::CPU, index) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
  c10::Device original_device() const { return device_; }
  c10::Device current_device() const { return device_; }

 private:
  c10::Device device_;
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
  void set_device(c10::Device) {}
  void reset() {}
};

}  // namespace cuda
}  // namespace c10
