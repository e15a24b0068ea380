#pragma once

#include <juce_core/juce_core.h>

#include <array>

namespace segue
{

/** A fixed-size single-producer single-consumer queue of plain values. Neither side ever locks or
    allocates, so the audio thread may be either end. Holds Capacity - 1 items. */
template <typename T, int Capacity>
class SpscFifo
{
public:
    /** Producer side. False (nothing written) when the queue is full. */
    bool push (const T& value) noexcept
    {
        const auto scope = fifo.write (1);
        if (scope.blockSize1 > 0) { items[(size_t) scope.startIndex1] = value; return true; }
        if (scope.blockSize2 > 0) { items[(size_t) scope.startIndex2] = value; return true; }
        return false;
    }

    /** Consumer side. False when the queue is empty. */
    bool pop (T& out) noexcept
    {
        const auto scope = fifo.read (1);
        if (scope.blockSize1 > 0) { out = items[(size_t) scope.startIndex1]; return true; }
        if (scope.blockSize2 > 0) { out = items[(size_t) scope.startIndex2]; return true; }
        return false;
    }

    int size() const noexcept { return fifo.getNumReady(); }

private:
    juce::AbstractFifo fifo { Capacity };
    std::array<T, (size_t) Capacity> items {};
};

} // namespace segue
