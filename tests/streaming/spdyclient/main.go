// spdyclient drives Podvisor's SPDY/3.1 codec with the library Kubernetes
// itself uses, github.com/moby/spdystream, over a raw TCP connection (no HTTP
// upgrade). It prints a transcript on stdout for tests/streaming/test_spdy_interop.py.
//
//	spdyclient client HOST:PORT   open streams against an echo server
//	spdyclient server             listen on 127.0.0.1, print the address, echo one connection
//
// Build offline with Debian's packages:
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build
package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/moby/spdystream"
)

const bigSize = 200000 // beyond the 64 KiB initial window, several times over

func fail(format string, args ...interface{}) {
	fmt.Printf("FAIL "+format+"\n", args...)
	os.Exit(1)
}

func describe(h http.Header) string {
	var parts []string
	for k, v := range h {
		parts = append(parts, strings.ToLower(k)+"="+strings.Join(v, ","))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i * 7 % 251)
	}
	return b
}

func runClient(addr string) {
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		fail("dial: %v", err)
	}
	raw.SetDeadline(time.Now().Add(30 * time.Second))
	conn, err := spdystream.NewConnection(raw, false)
	if err != nil {
		fail("connection: %v", err)
	}
	go conn.Serve(spdystream.NoOpStreamHandler)
	fmt.Println("connected")

	small, err := conn.CreateStream(http.Header{"streamType": {"stdout"}, "X-Multi": {"a", "b"}}, nil, false)
	if err != nil || small.Wait() != nil {
		fail("stream small: %v", err)
	}
	fmt.Printf("stream %d replied\n", small.Identifier())
	big, err := conn.CreateStream(http.Header{"streamType": {"data"}, "port": {"8080"}}, nil, false)
	if err != nil || big.Wait() != nil {
		fail("stream big: %v", err)
	}
	fmt.Printf("stream %d replied\n", big.Identifier())

	msg := []byte("hello over SPDY")
	if _, err := small.Write(msg); err != nil {
		fail("write small: %v", err)
	}
	echo := make([]byte, len(msg))
	if _, err := io.ReadFull(small, echo); err != nil {
		fail("read small: %v", err)
	}
	fmt.Printf("echo %d: %s\n", small.Identifier(), echo)

	payload := pattern(bigSize)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for off := 0; off < len(payload); off += 32 * 1024 {
			end := off + 32*1024
			if end > len(payload) {
				end = len(payload)
			}
			if _, err := big.Write(payload[off:end]); err != nil {
				fail("write big: %v", err)
			}
		}
	}()
	got := make([]byte, bigSize)
	if _, err := io.ReadFull(big, got); err != nil {
		fail("read big: %v", err)
	}
	wg.Wait()
	fmt.Printf("echo %d: %d bytes equal=%v\n", big.Identifier(), len(got), bytes.Equal(got, payload))

	if _, err := conn.Ping(); err != nil {
		fail("ping: %v", err)
	}
	fmt.Println("ping answered")

	if err := small.Close(); err != nil {
		fail("close: %v", err)
	}
	if n, err := small.Read(make([]byte, 1)); err != io.EOF {
		fail("after FIN: read %d, %v", n, err)
	}
	fmt.Printf("stream %d half-closed both ways\n", small.Identifier())

	if err := big.Reset(); err != nil {
		fail("reset: %v", err)
	}
	fmt.Printf("stream %d reset\n", big.Identifier())
	if err := conn.Close(); err != nil {
		fail("close connection: %v", err)
	}
	fmt.Println("done")
}

func runServer() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail("listen: %v", err)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	os.Stdout.Sync()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(30 * time.Second))
	raw, err := ln.Accept()
	if err != nil {
		fail("accept: %v", err)
	}
	raw.SetDeadline(time.Now().Add(30 * time.Second))
	conn, err := spdystream.NewConnection(raw, true)
	if err != nil {
		fail("connection: %v", err)
	}
	var mu sync.Mutex
	conn.Serve(func(stream *spdystream.Stream) {
		mu.Lock()
		fmt.Printf("stream %d opened: %s\n", stream.Identifier(), describe(stream.Headers()))
		mu.Unlock()
		if err := stream.SendReply(http.Header{"X-Reply": {"yes"}}, false); err != nil {
			return
		}
		go func() { // echo data; FIN after the peer's FIN
			n, _ := io.Copy(stream, stream)
			mu.Lock()
			fmt.Printf("stream %d echoed %d bytes\n", stream.Identifier(), n)
			mu.Unlock()
			stream.Close()
		}()
		go func() { // echo HEADERS frames
			for {
				h, err := stream.ReceiveHeader()
				if err != nil {
					return
				}
				stream.SendHeader(h, false)
			}
		}()
	})
	fmt.Println("connection closed")
}

func main() {
	switch {
	case len(os.Args) == 3 && os.Args[1] == "client":
		runClient(os.Args[2])
	case len(os.Args) == 2 && os.Args[1] == "server":
		runServer()
	default:
		fmt.Fprintln(os.Stderr, "usage: spdyclient client HOST:PORT | spdyclient server")
		os.Exit(2)
	}
}
