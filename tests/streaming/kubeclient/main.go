// kubeclient speaks to the CRI streaming server what kubectl and kubelet
// speak through client-go: the SPDY/3.1 upgrade with X-Stream-Protocol-Version
// negotiation, remote command (exec/attach, channel.k8s.io v1..v4, the v4 error
// stream's JSON Status) and port forward (portforward.k8s.io stream pairs with
// streamType, port and requestID headers), on github.com/moby/spdystream.
// Driven by tests/streaming/test_server_spdy.py.
//
//	kubeclient upgrade -url URL -protocols P1,P2      print the upgrade answer
//	kubeclient exec -url URL -protocols ... [-stdin] [-stdout] [-stderr] [-tty -size WxH -size2 WxH] -result FILE
//	kubeclient portforward -url URL PORT...           forward local ports until stdin ends
//
// Build offline with Debian's packages:
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build
package main

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/moby/spdystream"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "kubeclient: "+format+"\n", args...)
	os.Exit(2)
}

type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(p []byte) (int, error) { return c.r.Read(p) }

type answer struct {
	status   int
	protocol string
	accepted []string
	body     string
}

// upgrade sends the request client-go's SPDY round tripper sends and reads the answer.
func upgrade(rawurl string, protocols []string) (net.Conn, answer) {
	u, err := url.Parse(rawurl)
	if err != nil {
		fail("url: %v", err)
	}
	var c net.Conn
	if u.Scheme == "https" {
		c, err = tls.Dial("tcp", u.Host, &tls.Config{InsecureSkipVerify: true})
	} else {
		c, err = net.DialTimeout("tcp", u.Host, 10*time.Second)
	}
	if err != nil {
		fail("dial: %v", err)
	}
	req, _ := http.NewRequest("POST", rawurl, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "SPDY/3.1")
	for _, p := range protocols {
		req.Header.Add("X-Stream-Protocol-Version", p)
	}
	if err := req.Write(c); err != nil {
		fail("write request: %v", err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		fail("read response: %v", err)
	}
	a := answer{status: resp.StatusCode, protocol: resp.Header.Get("X-Stream-Protocol-Version"),
		accepted: resp.Header.Values("X-Accepted-Stream-Protocol-Versions")}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := ioutil.ReadAll(resp.Body)
		a.body = strings.TrimSpace(string(body))
		c.Close()
		return nil, a
	}
	return &bufConn{Conn: c, r: br}, a
}

func session(c net.Conn) *spdystream.Connection {
	conn, err := spdystream.NewConnection(c, false)
	if err != nil {
		fail("spdy: %v", err)
	}
	go conn.Serve(spdystream.NoOpStreamHandler)
	go func() { // client-go's PingPeriod
		for {
			time.Sleep(5 * time.Second)
			if _, err := conn.Ping(); err != nil {
				return
			}
		}
	}()
	return conn
}

func create(conn *spdystream.Connection, h http.Header) *spdystream.Stream {
	s, err := conn.CreateStream(h, nil, false)
	if err != nil {
		fail("create stream %v: %v", h, err)
	}
	if err := s.WaitTimeout(30 * time.Second); err != nil {
		fail("stream %v not replied: %v", h, err)
	}
	return s
}

func protocolsFlag(fs *flag.FlagSet) *string {
	return fs.String("protocols", "v4.channel.k8s.io,v3.channel.k8s.io,v2.channel.k8s.io,channel.k8s.io",
		"offered protocols, most preferred first")
}

func cmdUpgrade(args []string) {
	fs := flag.NewFlagSet("upgrade", flag.ExitOnError)
	u := fs.String("url", "", "streaming URL")
	protos := protocolsFlag(fs)
	fs.Parse(args)
	var list []string
	if *protos != "" {
		list = strings.Split(*protos, ",")
	}
	c, a := upgrade(*u, list)
	if c != nil {
		c.Close()
	}
	fmt.Printf("status=%d protocol=%s accepted=%s\n", a.status, a.protocol, strings.Join(a.accepted, ","))
	if a.body != "" {
		fmt.Printf("body=%s\n", a.body)
	}
}

// status is the part of metav1.Status client-go's v4 error decoder reads.
type status struct {
	Status  string `json:"status"`
	Message string `json:"message"`
	Reason  string `json:"reason"`
	Details *struct {
		Causes []struct {
			Type    string `json:"reason"`
			Message string `json:"message"`
		} `json:"causes"`
	} `json:"details"`
}

// exitFromErrorStream turns what the error stream said into an exit code or an error, as client-go does.
func exitFromErrorStream(protocol string, msg []byte) (int, string) {
	if len(msg) == 0 {
		return 0, ""
	}
	if protocol != "v4.channel.k8s.io" {
		return -1, string(msg)
	}
	var st status
	if err := json.Unmarshal(msg, &st); err != nil {
		return -1, fmt.Sprintf("error stream protocol error: %v in %q", err, msg)
	}
	if st.Status == "Success" {
		return 0, ""
	}
	if st.Reason == "NonZeroExitCode" && st.Details != nil {
		for _, c := range st.Details.Causes {
			if c.Type == "ExitCode" {
				rc, err := strconv.Atoi(c.Message)
				if err != nil || rc < 0 || rc > 255 {
					return -1, fmt.Sprintf("bad exit code %q", c.Message)
				}
				return rc, ""
			}
		}
	}
	return -1, st.Message
}

func parseSize(s string) (uint16, uint16) {
	var w, h uint16
	if _, err := fmt.Sscanf(s, "%dx%d", &w, &h); err != nil {
		fail("size %q: %v", s, err)
	}
	return w, h
}

func cmdExec(args []string) {
	fs := flag.NewFlagSet("exec", flag.ExitOnError)
	u := fs.String("url", "", "streaming URL")
	protos := protocolsFlag(fs)
	withStdin := fs.Bool("stdin", false, "send our stdin")
	withStdout := fs.Bool("stdout", true, "receive stdout")
	withStderr := fs.Bool("stderr", true, "receive stderr")
	tty := fs.Bool("tty", false, "terminal")
	size := fs.String("size", "", "initial terminal size WxH")
	size2 := fs.String("size2", "", "terminal size sent on SIGUSR1")
	result := fs.String("result", "", "file for the outcome")
	fs.Parse(args)

	c, a := upgrade(*u, strings.Split(*protos, ","))
	if c == nil {
		fail("upgrade refused: %d %s", a.status, a.body)
	}
	protocol := a.protocol
	if protocol == "" {
		protocol = "channel.k8s.io"
	}
	conn := session(c)
	errStream := create(conn, http.Header{"streamType": {"error"}})
	var wg sync.WaitGroup
	if *withStdin {
		in := create(conn, http.Header{"streamType": {"stdin"}})
		go func() {
			io.Copy(in, os.Stdin)
			in.Close()
		}()
	}
	if *withStdout {
		out := create(conn, http.Header{"streamType": {"stdout"}})
		wg.Add(1)
		go func() { defer wg.Done(); io.Copy(os.Stdout, out) }()
	}
	if *withStderr && !*tty {
		errOut := create(conn, http.Header{"streamType": {"stderr"}})
		wg.Add(1)
		go func() { defer wg.Done(); io.Copy(os.Stderr, errOut) }()
	}
	if *tty && protocol != "channel.k8s.io" && protocol != "v2.channel.k8s.io" {
		resize := create(conn, http.Header{"streamType": {"resize"}})
		enc := json.NewEncoder(resize)
		send := func(s string) {
			w, h := parseSize(s)
			enc.Encode(struct{ Width, Height uint16 }{w, h})
		}
		if *size != "" {
			send(*size)
		}
		if *size2 != "" {
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, syscall.SIGUSR1)
			go func() {
				for range sig {
					send(*size2)
				}
			}()
		}
	}
	msg, err := ioutil.ReadAll(errStream)
	if err != nil {
		fail("read error stream: %v", err)
	}
	rc, problem := exitFromErrorStream(protocol, msg)
	wg.Wait()
	conn.Close()
	outcome := fmt.Sprintf("protocol=%s\nexit=%d\n", protocol, rc)
	if problem != "" {
		outcome += "error=" + problem + "\n"
	}
	if *result != "" {
		ioutil.WriteFile(*result, []byte(outcome), 0o644)
	}
}

func cmdPortForward(args []string) {
	fs := flag.NewFlagSet("portforward", flag.ExitOnError)
	u := fs.String("url", "", "streaming URL")
	fs.Parse(args)
	c, a := upgrade(*u, []string{"portforward.k8s.io"})
	if c == nil {
		fail("upgrade refused: %d %s", a.status, a.body)
	}
	conn := session(c)
	var mu sync.Mutex
	requestID := 0
	say := func(format string, args ...interface{}) {
		mu.Lock()
		fmt.Printf(format+"\n", args...)
		os.Stdout.Sync()
		mu.Unlock()
	}
	handle := func(local net.Conn, port string) {
		defer local.Close()
		mu.Lock()
		id := strconv.Itoa(requestID)
		requestID++
		mu.Unlock()
		h := http.Header{"streamType": {"error"}, "port": {port}, "requestID": {id}}
		errStream := create(conn, h)
		errStream.Close() // we never write to it
		errc := make(chan string, 1)
		go func() {
			msg, _ := ioutil.ReadAll(errStream)
			errc <- string(msg)
		}()
		data := create(conn, http.Header{"streamType": {"data"}, "port": {port}, "requestID": {id}})
		remoteDone := make(chan struct{})
		localDone := make(chan struct{})
		go func() { io.Copy(local, data); close(remoteDone) }()
		go func() { io.Copy(data, local); data.Close(); close(localDone) }()
		select {
		case <-remoteDone:
		case <-localDone:
			<-remoteDone
		}
		if msg := <-errc; msg != "" {
			say("error port=%s: %s", port, msg)
		}
		data.Reset()
		errStream.Reset()
	}
	for _, port := range fs.Args() {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fail("listen: %v", err)
		}
		say("forwarding %d -> %s", ln.Addr().(*net.TCPAddr).Port, port)
		go func(ln net.Listener, port string) {
			for {
				local, err := ln.Accept()
				if err != nil {
					return
				}
				go handle(local, port)
			}
		}(ln, port)
	}
	say("ready")
	io.Copy(ioutil.Discard, os.Stdin)
	conn.Close()
	say("done")
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: kubeclient upgrade|exec|portforward ...")
	}
	switch os.Args[1] {
	case "upgrade":
		cmdUpgrade(os.Args[2:])
	case "exec":
		cmdExec(os.Args[2:])
	case "portforward":
		cmdPortForward(os.Args[2:])
	default:
		fail("unknown command %q", os.Args[1])
	}
}
