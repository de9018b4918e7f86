// Recycled zero pages for the CPU MoE weight gradients.
//
// Why: the gradient of the stacked expert weights ([E, 2I, H] and [E, H, I]: 1.2 GB for a
// Qwen3-30B-A3B layer in bf16) is zero except for the experts that received tokens. A fresh
// anonymous mapping gives the zeros for free, but every page the GEMMs then write faults in
// on first touch: ~0.25 us + zeroing per 4 KB page on bare metal, several us on a VM whose
// freed pages go back to the host (virtio free page reporting). Measured on the 2-core CI VM:
// writing 8 of 128 gate_up expert slabs (50 MB) takes 62 ms into a fresh mapping and 2.9 ms
// into pages kept from the previous step. torch's CPU allocator has no cache, and glibc
// maps every block above 32 MB fresh, while HF's per-expert gradients (3-6 MB each) come
// from glibc's heap and reuse its pages: that was the whole gap at one token.
//
// How: a block is a private anonymous mapping cut in E slabs of a page multiple. When its
// last tensor is freed it goes to a bounded cache with the list of slabs it was told to
// overwrite (the populated ones). The next take of the same size reuses it:
//   1. each populated slab that is not written this time is moved with mremap (page tables
//      only: no copy, no fault) onto a slab that is, and its old range gets a fresh zero
//      mapping (MAP_FIXED);
//   2. every range outside this take's written slabs gets MADV_DONTNEED, which turns it back
//      into zero pages whatever anyone wrote there meanwhile (an in-place op, .data, numpy)
//      and costs almost nothing where no page is mapped (~0.03 ms over 1.2 GB).
// So a reused block is all zeros outside the written slabs by construction, not by trusting
// how the previous tensor was used. Any failure of the page-table calls falls back to a
// fresh mapping. The cache holds at most QWEN3_FAST_CPU_GRAD_CACHE_MB of populated slabs
// (default: 1/8 of the physical memory; 0 turns the cache off), least recently freed
// evicted first; zero_slabs_empty_cache() unmaps it all.
#include "zero_slabs.h"

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace qwen3_fast::cpu {

#if defined(__linux__)
namespace {

struct Cached {
  char* base;
  std::size_t nbytes, slab;
  std::vector<std::int64_t> written;
  std::size_t resident() const { return written.size() * slab; }
};

std::size_t cap_from_env() {
  if (const char* v = std::getenv("QWEN3_FAST_CPU_GRAD_CACHE_MB")) {
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    if (end != v && *end == '\0' && mb >= 0) return static_cast<std::size_t>(mb) << 20;
    // an unreadable setting must not silently keep gigabytes: the cache stays off
    return 0;
  }
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<std::size_t>(pages) * page / 8 : 0;
}

constexpr std::size_t kMaxBlocks = 256;  // a bound on mappings kept, whatever their size

struct Cache {
  std::mutex mu;
  std::vector<Cached> blocks;  // least recently freed first
  std::size_t bytes = 0, cap = cap_from_env();
  std::int64_t hits = 0, misses = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: blocks may be freed during interpreter exit
  return *c;
}

char* map_fresh(std::size_t nbytes) {
  void* p = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    throw std::runtime_error("zero_slabs: could not map " + std::to_string(nbytes) +
                             " bytes for a CPU gradient (out of memory?)");
  return static_cast<char*>(p);
}

// Steps 1 and 2 of the file comment. False when a page-table call failed (the block's
// contents are then unknown: the caller unmaps it).
bool recycle(Cached& c, const std::vector<std::int64_t>& written) {
  std::vector<std::int64_t> src, dst;  // populated and not written / written and not populated
  std::set_difference(c.written.begin(), c.written.end(), written.begin(), written.end(),
                      std::back_inserter(src));
  std::set_difference(written.begin(), written.end(), c.written.begin(), c.written.end(),
                      std::back_inserter(dst));
  const std::size_t moves = std::min(src.size(), dst.size());
  for (std::size_t i = 0; i < moves; ++i) {
    char* from = c.base + src[i] * c.slab;
    char* to = c.base + dst[i] * c.slab;
    if (mremap(from, c.slab, c.slab, MREMAP_MAYMOVE | MREMAP_FIXED, to) == MAP_FAILED)
      return false;
    if (mmap(from, c.slab, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
             0) == MAP_FAILED)
      return false;
  }
  std::size_t at = 0;  // zero every gap between written slabs
  for (const std::int64_t w : written) {
    const std::size_t lo = static_cast<std::size_t>(w) * c.slab;
    if (lo > at && madvise(c.base + at, lo - at, MADV_DONTNEED) != 0) return false;
    at = lo + c.slab;
  }
  if (at < c.nbytes && madvise(c.base + at, c.nbytes - at, MADV_DONTNEED) != 0) return false;
  return true;
}

}  // namespace

bool zero_slabs_supported() { return true; }
std::size_t zero_slabs_page_size() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }

std::unique_ptr<ZeroSlabBlock> zero_slabs_take(std::size_t nbytes, std::size_t slab,
                                               const std::vector<std::int64_t>& written) {
  const std::size_t page = zero_slabs_page_size();
  if (slab == 0 || slab % page != 0)
    throw std::invalid_argument("zero_slabs: slab must be a positive multiple of the page size (" +
                                std::to_string(page) + " bytes), got " + std::to_string(slab));
  if (nbytes == 0 || nbytes % slab != 0)
    throw std::invalid_argument("zero_slabs: nbytes must be a positive multiple of slab (" +
                                std::to_string(slab) + "), got " + std::to_string(nbytes));
  const auto slabs = static_cast<std::int64_t>(nbytes / slab);
  for (std::size_t i = 0; i < written.size(); ++i) {
    if (written[i] < 0 || written[i] >= slabs || (i > 0 && written[i] <= written[i - 1]))
      throw std::invalid_argument("zero_slabs: written must be strictly increasing slab indices in [0, " +
                                  std::to_string(slabs) + ")");
  }
  Cache& ca = cache();
  Cached c{nullptr, nbytes, slab, {}};
  {
    std::lock_guard<std::mutex> lock(ca.mu);
    for (auto it = ca.blocks.rbegin(); it != ca.blocks.rend(); ++it) {
      if (it->nbytes == nbytes && it->slab == slab) {
        c = std::move(*it);
        ca.blocks.erase(std::next(it).base());
        ca.bytes -= c.resident();
        break;
      }
    }
    ++(c.base ? ca.hits : ca.misses);
  }
  if (c.base && !recycle(c, written)) {
    munmap(c.base, c.nbytes);
    c.base = nullptr;
  }
  if (!c.base) c.base = map_fresh(nbytes);
  return std::make_unique<ZeroSlabBlock>(c.base, nbytes, slab, written);
}

ZeroSlabBlock::~ZeroSlabBlock() {
  Cache& ca = cache();
  Cached c{base_, nbytes_, slab_, std::move(written_)};
  std::vector<Cached> evicted;
  {
    std::lock_guard<std::mutex> lock(ca.mu);
    if (ca.cap > 0 && c.resident() <= ca.cap) {
      std::size_t drop = 0;  // least recently freed first
      while (drop < ca.blocks.size() &&
             (ca.bytes + c.resident() > ca.cap || ca.blocks.size() - drop >= kMaxBlocks)) {
        ca.bytes -= ca.blocks[drop].resident();
        ++drop;
      }
      evicted.assign(std::make_move_iterator(ca.blocks.begin()),
                     std::make_move_iterator(ca.blocks.begin() + drop));
      ca.blocks.erase(ca.blocks.begin(), ca.blocks.begin() + drop);
      ca.bytes += c.resident();
      ca.blocks.push_back(std::move(c));
      c.base = nullptr;
    }
  }
  for (const Cached& e : evicted) munmap(e.base, e.nbytes);  // outside the lock
  if (c.base) munmap(c.base, c.nbytes);
}

ZeroSlabStats zero_slabs_stats() {
  Cache& ca = cache();
  std::lock_guard<std::mutex> lock(ca.mu);
  ZeroSlabStats s;
  s.hits = ca.hits;
  s.misses = ca.misses;
  s.cached_blocks = static_cast<std::int64_t>(ca.blocks.size());
  s.cached_bytes = ca.bytes;
  s.cap_bytes = ca.cap;
  return s;
}

void zero_slabs_empty_cache() {
  Cache& ca = cache();
  std::vector<Cached> all;
  {
    std::lock_guard<std::mutex> lock(ca.mu);
    all.swap(ca.blocks);
    ca.bytes = 0;
  }
  for (const Cached& e : all) munmap(e.base, e.nbytes);
}

#else  // no mremap: Python keeps its calloc path (zero_slabs_supported() is false)

bool zero_slabs_supported() { return false; }
std::size_t zero_slabs_page_size() { return 4096; }
std::unique_ptr<ZeroSlabBlock> zero_slabs_take(std::size_t, std::size_t,
                                               const std::vector<std::int64_t>&) {
  throw std::runtime_error("zero_slabs: not supported on this platform");
}
ZeroSlabBlock::~ZeroSlabBlock() {}
ZeroSlabStats zero_slabs_stats() { return {}; }
void zero_slabs_empty_cache() {}

#endif

}  // namespace qwen3_fast::cpu
