// A persistent pool of worker threads for the CPU backend.
#pragma once

#include <functional>

namespace flashmoe::cpu {

// Runs fn(member) for member in [0, team_size), each on its own thread, all at the same time
// (the caller is member 0), so members may wait on each other. The first exception thrown by a
// member is rethrown here after every member has returned. Calls from several threads are
// serialized; a call from inside a member throws std::logic_error instead of deadlocking.
void run_team(int team_size, const std::function<void(int member)>& fn);

}  // namespace flashmoe::cpu
