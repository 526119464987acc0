#pragma once
// Durations in messages: "N ms" for whole milliseconds (the usual case, and every message's
// form so far), finer ones in their own unit ("500 us", "1.5 ms", "250 ns"), so that a 500 us
// timeout does not read "0 ms".

#include <string>

#include "scales/core/clock.h"

namespace scales {

std::string DurationText(Duration d);

// A measured or randomly drawn duration (time since an event, a jittered backoff), rounded to
// what a reader needs: "250 ns", "160 us", "7.5 ms", "870 ms", "12.3 s". DurationText's exact
// form would print such a value as "0.160394 ms" or "7523.456789 ms". Configured values, which
// the reader set and may look for, keep DurationText.
std::string ApproxDurationText(Duration d);

}  // namespace scales
