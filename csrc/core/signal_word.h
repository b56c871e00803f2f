// SignalWord: the 64-bit flag that announces a payload in the symmetric heap.
//
//   bits 63..48  epoch      (1..65535; 0 means "never written", the heap's initial state)
//   bits 47..24  rows       (rows of the payload, < 2^24)
//   bits 23..0   first_row  (where the payload starts in its region, in rows, < 2^24)
//
// A word is written once per call with a release store after its payload, and read with
// acquire loads. Flags are never cleared: a reader waits for the word whose epoch is the
// current call's, and every flag is written on every call (an empty cell still signals rows=0),
// so a stale word holds the previous epoch (or 0 before the first call), never the current one.
// The payload's tile count is row_tiles(rows) (core/tiling.h): receivers derive it.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace flashmoe {

struct SignalWord {
  static constexpr uint64_t kFieldMask = (uint64_t(1) << 24) - 1;
  static constexpr int64_t kMaxRows = int64_t(kFieldMask);
  static constexpr uint32_t kEpochs = 65535;  // epochs run 1..kEpochs, then wrap to 1

  uint64_t bits = 0;

  FLASHMOE_HD static SignalWord make(uint32_t epoch, int64_t rows, int64_t first_row) {
    return SignalWord{(uint64_t(epoch & 0xffffu) << 48) | ((uint64_t(rows) & kFieldMask) << 24) |
                      (uint64_t(first_row) & kFieldMask)};
  }
  FLASHMOE_HD uint32_t epoch() const { return uint32_t(bits >> 48); }
  FLASHMOE_HD int64_t rows() const { return int64_t((bits >> 24) & kFieldMask); }
  FLASHMOE_HD int64_t first_row() const { return int64_t(bits & kFieldMask); }
  FLASHMOE_HD bool is_epoch(uint32_t current) const { return epoch() == current; }

  FLASHMOE_HD static uint32_t next_epoch(uint32_t epoch) { return epoch >= kEpochs ? 1u : epoch + 1u; }
  FLASHMOE_HD static uint32_t previous_epoch(uint32_t epoch) { return epoch <= 1u ? kEpochs : epoch - 1u; }
};

static_assert(sizeof(SignalWord) == 8, "a SignalWord is one 64-bit word");

}  // namespace flashmoe
