"""The Fast DDS profile for processes of one host that exchange camera frames: ovss-demo's node
and its player, and the tests' nodes and clients (not for a robot: config/fastdds_large_data.xml).

A 16 MiB shared-memory segment, since a 640x480 rgb8 frame is larger than Fast DDS's default
512 KB one and would be lost under BEST_EFFORT, and UDP kept on the loopback interface. Written
to a file and named in FASTDDS_DEFAULT_PROFILES_FILE before a process creates its first
participant (Fast DDS reads it once per process).
"""

LOCAL_LARGE_FRAMES_PROFILE = """<?xml version="1.0" encoding="UTF-8"?>
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <transport_descriptors>
      <transport_descriptor>
        <transport_id>shm_16mib</transport_id>
        <type>SHM</type>
        <segment_size>16777216</segment_size>
      </transport_descriptor>
      <transport_descriptor>
        <transport_id>udp_localhost</transport_id>
        <type>UDPv4</type>
        <interfaces><allowlist><interface name="127.0.0.1"/></allowlist></interfaces>
      </transport_descriptor>
    </transport_descriptors>
    <participant profile_name="ovss_local_large_frames" is_default_profile="true">
      <rtps>
        <useBuiltinTransports>false</useBuiltinTransports>
        <userTransports>
          <transport_id>shm_16mib</transport_id>
          <transport_id>udp_localhost</transport_id>
        </userTransports>
      </rtps>
    </participant>
  </profiles>
</dds>
"""
