#pragma once
// Durations in messages: "N ms" for whole milliseconds (the usual case, and every message's
// form so far), finer ones in their own unit ("500 us", "1.5 ms", "250 ns"), so that a 500 us
// timeout does not read "0 ms".

#include <string>

#include "scales/core/clock.h"

namespace scales {

std::string DurationText(Duration d);

}  // namespace scales
