// Recycled zero pages for large, mostly-zero CPU buffers cut in equal slabs: the MoE expert
// weight gradients [E, N, K], where only the experts that received tokens are written
// (zero_slabs.cpp has the why and the how). No torch here: Python wraps a block's memory
// with torch.frombuffer (the block exports the buffer protocol) and the block goes back to
// the cache when its last tensor is freed.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace qwen3_fast::cpu {

// One mapping of `nbytes` bytes in slabs of `slab` bytes. Destroying it hands it back to
// the cache (or unmaps it when the cache is full or disabled).
class ZeroSlabBlock {
 public:
  ZeroSlabBlock(char* base, std::size_t nbytes, std::size_t slab, std::vector<std::int64_t> written)
      : base_(base), nbytes_(nbytes), slab_(slab), written_(std::move(written)) {}
  ZeroSlabBlock(const ZeroSlabBlock&) = delete;
  ZeroSlabBlock& operator=(const ZeroSlabBlock&) = delete;
  ~ZeroSlabBlock();
  void* data() const { return base_; }
  std::size_t nbytes() const { return nbytes_; }

 private:
  char* base_;
  std::size_t nbytes_, slab_;
  std::vector<std::int64_t> written_;  // slab indices the caller was told to overwrite
};

// True where blocks can be recycled (Linux: mremap and MADV_DONTNEED).
bool zero_slabs_supported();
std::size_t zero_slabs_page_size();

// A block whose bytes are zero everywhere except the slabs listed in `written` (strictly
// increasing indices in [0, nbytes / slab)), which hold arbitrary bytes that the caller
// must overwrite in full. nbytes a positive multiple of slab, slab of the page size.
// std::invalid_argument on bad arguments, std::runtime_error when no memory can be mapped.
std::unique_ptr<ZeroSlabBlock> zero_slabs_take(std::size_t nbytes, std::size_t slab,
                                               const std::vector<std::int64_t>& written);

struct ZeroSlabStats {
  std::int64_t hits = 0, misses = 0;  // takes served from the cache / by a fresh mapping
  std::int64_t cached_blocks = 0;
  std::size_t cached_bytes = 0;  // written slabs of the cached blocks (their resident pages)
  std::size_t cap_bytes = 0;     // QWEN3_FAST_CPU_GRAD_CACHE_MB, default 1/8 of the RAM
};
ZeroSlabStats zero_slabs_stats();
// Unmaps every cached block (blocks in use are not affected).
void zero_slabs_empty_cache();

}  // namespace qwen3_fast::cpu
