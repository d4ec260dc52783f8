/* device.cu -- how many CUDA devices this process can use. */
#include <cuda_runtime.h>

#include "kvck_cuda.h"

extern "C" int kvck_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError(); /* no driver or no device: clear, report 0 */
        return 0;
    }
    return n > 0 ? n : 0;
}
