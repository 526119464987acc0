# The ZooKeeper C client (multi-threaded build). It has no pkg-config or CMake package.
find_library(ZOOKEEPER_MT_LIBRARY zookeeper_mt REQUIRED)
find_path(ZOOKEEPER_INCLUDE_DIR zookeeper/zookeeper.h REQUIRED)
add_library(zookeeper_mt INTERFACE)
target_link_libraries(zookeeper_mt INTERFACE ${ZOOKEEPER_MT_LIBRARY})
target_include_directories(zookeeper_mt SYSTEM INTERFACE ${ZOOKEEPER_INCLUDE_DIR})
# The synchronous API of the mt client is only declared with THREADED.
target_compile_definitions(zookeeper_mt INTERFACE THREADED)
